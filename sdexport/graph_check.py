"""Every graph `convert` writes is checked before the export is put in place.

Two checks, both on the written file (so graphs over 2 GB are checked the same way): ONNX's
checker (structure, node order) and its shape inference with type checking in strict mode, which
names the first node whose input types clash; and a session on the target's own provider where this machine has it (the CPU EP for
generic, cpu and tensorrt graphs), which is what a user's runtime does first.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import GraphCheckFailed

# ONNX: "(op_type:Mul, node name: /unet/time_proj/Mul): B has ..."; ORT: "... in node (/unet/time_proj/Mul)."
NODE_IN_MESSAGE = (re.compile(r"node name: ([^)]*)\):\s*(.*)", re.S), re.compile(r"in node \(([^)]*)\)"))


def failing_node(message: str) -> tuple[str, str]:
    """(node name, reason) from an ONNX or ONNX Runtime error message; "?" when it names none."""
    match = NODE_IN_MESSAGE[0].search(message)
    if match:
        return match.group(1) or "?", match.group(2)
    match = NODE_IN_MESSAGE[1].search(message)
    return (match.group(1) if match else "?"), message


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_types(component: str, path: Path) -> None:
    """ONNX's strict type inference over the written graph (weights are not read)."""

    with tempfile.TemporaryDirectory(prefix="sdexport-check-") as tmp:
        try:
            onnx.checker.check_model(str(path))  # structure, node order and opsets; by path for any size
            onnx.shape_inference.infer_shapes_path(
                str(path), str(Path(tmp) / "inferred.onnx"), check_type=True, strict_mode=True
            )
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
            node, reason = failing_node(str(e))
            raise GraphCheckFailed(
                f"{component}/model.onnx fails ONNX's checks at node {node}: {one_line(reason)}"
            ) from e


def check_loads(component: str, path: Path, provider: str) -> None:
    """Create a session for the written graph on `provider`, at the level the runtime loads it."""

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # the session never runs: the CPU kernels' packed copies of the weights would only add to the peak
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
        node, reason = failing_node(str(e))
        raise GraphCheckFailed(
            f"{component}/model.onnx does not load on {provider} (node {node}): {one_line(reason)}"
        ) from e
    del session


def check_written_graph(component: str, path: Path, provider: str | None) -> None:
    """Both checks; `provider` None when this machine cannot run the target's graphs."""
    check_types(component, path)
    if provider is not None:
        check_loads(component, path, provider)
