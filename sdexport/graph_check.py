"""Every graph `convert` writes is checked before the export is put in place.

Two checks, both on the written file (so graphs over 2 GB are checked the same way): ONNX's
checker (structure, node order) and its shape inference with type checking in strict mode, which
names the first node whose input types clash; and a session on the target's own provider where this machine has it (the CPU EP for
generic, cpu and tensorrt graphs), which is what a user's runtime does first.

ONNX Runtime defines some ops in the ONNX domain that ONNX itself lacks: SimplifiedLayerNormalization
(RMSNorm), which ORT's CPU optimizer and the t5/mmdit fusions write. ONNX's checker refuses such a
graph ("No Op registered for SimplifiedLayerNormalization"), and its inference types nothing after
one. Those nodes are checked as the standard op that has their inputs, outputs and type rules
(`with_standard_stand_ins`), on the graph read without its external weights.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import GraphCheckFailed

# ORT's ONNX-domain op -> the standard op checked in its place (same inputs, attributes and type rule:
# ORT's SimplifiedLayerNormalization(X, scale) -> (Y, inv_std_var) is LayerNormalization without a bias
# and its mean output; kept fp32 or converted, every graph here gives X, scale and Y one type)
STAND_INS = {"SimplifiedLayerNormalization": "LayerNormalization"}
STAND_IN_MIN_OPSET = 17  # LayerNormalization came with opset 17

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


def onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def needs_stand_ins(model: onnx.ModelProto) -> bool:
    return onnx_opset(model) >= STAND_IN_MIN_OPSET and any(
        n.domain in ("", "ai.onnx") and n.op_type in STAND_INS for n in model.graph.node
    )


def with_standard_stand_ins(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each of ORT's ONNX-domain ops (STAND_INS) replaced, in place, by its standard stand-in;
    node names, inputs and outputs stay, so inference types the same tensors and names the same nodes."""
    if not needs_stand_ins(model):
        return model
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in STAND_INS:
            node.op_type = STAND_INS[node.op_type]
            if len(node.output) > 1:  # (Y, inv_std_var) -> (Y, mean, inv_std_var)
                outputs = [node.output[0], "", *node.output[1:2]]
                del node.output[:]
                node.output.extend(outputs)
    return model


def check_types(component: str, path: Path) -> None:
    """ONNX's strict type inference over the written graph (weights are not read)."""

    with tempfile.TemporaryDirectory(prefix="sdexport-check-") as tmp:
        try:
            graph = onnx.load(str(path), load_external_data=False)  # a graph past 2 GB keeps its weights in files
            if needs_stand_ins(graph):
                onnx.checker.check_model(with_standard_stand_ins(graph))
                onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True)
                return
            del graph
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
