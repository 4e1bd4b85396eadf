"""One component from its traced fp32 file to its written graph: finished for the target and dtype
(optimize.py), written, checked (graph_check.py) and compared with PyTorch (compare.py)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from sdruntime.manifest import TEXT_ENCODER_MASK, UNET_RESIDUAL_INPUTS, PipelineFacts, StaticShapes, file_entry

from .artifacts import Written
from .compare import compare_outputs
from .graph_check import check_written_graph
from .graph_files import OnDisk, graph_of, save_model
from .optimize import finish_graph, uses_cpu_layout
from .progress import end, mark
from .targets import EXPORT_TARGETS
from .trace import Traced, trace_component
from .weight_map import map_weights


def checkable(target: str) -> bool:
    """Whether this machine can run the target's graphs to compare them with PyTorch."""

    return EXPORT_TARGETS[target].check_provider in ort.get_available_providers()


def check_written(component: str, path: Path, target: str) -> None:
    """The written graph type-checks and, where this machine runs its target, loads (graph_check.py)."""

    check_written_graph(component, path, EXPORT_TARGETS[target].check_provider if checkable(target) else None)


def finish_component(
    traced: Traced,
    folder: Path,
    target: str,
    fp16: bool,
    upcast_attention: bool,
    extra_fp32_nodes: Sequence[str] = (),
) -> Written:
    """Finish a traced graph for the target and dtype, write it, check it, and compare it with
    PyTorch's outputs when it was traced with a reference. Returns what the manifest records of it."""

    component = traced.component
    mark(component, "optimize")
    model, kept = finish_graph(
        component, traced.path, target, fp16, upcast_attention, extra_fp32_nodes, streamed=traced.streamed
    )
    if component == "unet" and EXPORT_TARGETS[target].residual_defaults:
        graph = graph_of(model).graph
        add_zero_defaults(graph, residual_input_names(graph))
    if EXPORT_TARGETS[target].residual_defaults:  # the text encoders' attention_mask, where they take one
        add_mask_default(graph_of(model).graph)
    mark(component, "write")
    path = folder / component / "model.onnx"
    if traced.streamed:  # its weights are still in the traced files: written first, then those go
        files = save_model(model, path)
    shutil.rmtree(traced.path.parent)
    # the folders above it up to .fp32 (controlnet/ for "controlnet/NAME"), once every traced graph is finished
    for empty in Path(component).parents[:-1]:
        with contextlib.suppress(OSError):
            (folder / ".fp32" / empty).rmdir()
    with contextlib.suppress(OSError):
        (folder / ".fp32").rmdir()
    if not traced.streamed:
        files = save_model(model, path)
    laid_out = uses_cpu_layout(graph_of(model))
    if isinstance(model, OnDisk) and model.owner is not None:
        model.owner.cleanup()  # written: its folder goes now, not when the object is collected (a warning then)
    del model
    mark(component, "check")
    check_written(component, path, target)
    weights = map_weights(path, traced.weights) if traced.weights is not None else None
    result = None
    if traced.reference is not None:
        mark(component, "compare")
        result = compare_outputs(traced.reference, path, EXPORT_TARGETS[target].check_provider, traced.streamed)
    end()
    files = tuple(file_entry(folder, f"{component}/{name}") for name in files)
    return Written(files, tuple(kept), result, laid_out, weights)


def residual_input_names(graph: onnx.GraphProto) -> list[str]:
    """The U-Net's ControlNet residual inputs."""
    down, mid = UNET_RESIDUAL_INPUTS
    prefix = down.format("")
    return [i.name for i in graph.input if i.name.startswith(prefix) or i.name == mid]


def add_zero_defaults(graph: onnx.GraphProto, names: list[str]) -> None:
    """Give inputs [batch, C, h, w] a default: an initializer of zeros [1, C, 1, 1] by the same name, which
    ONNX Runtime uses when the input is not fed and which broadcasts in the U-Net's residual Add. Inputs of
    fixed sizes (static exports) get none: they stay required, and the runtime feeds them zeros."""
    inputs = {i.name: i for i in graph.input}
    for name in names:
        tensor_type = inputs[name].type.tensor_type
        if tensor_type.shape.dim[0].HasField("dim_value"):
            continue  # a static export's: ONNX checks a default against the fixed shape, so it stays required
        channels = tensor_type.shape.dim[1].dim_value
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, channels, 1, 1), dtype), name))


def add_mask_default(graph: onnx.GraphProto) -> None:
    """Give a text encoder's attention_mask [batch, tokens] a default: ones [1, tokens] by the same name, so
    runners that feed input_ids alone (optimum) get the unmasked encoding. A static export's stays required
    (the runtime feeds ones), as add_zero_defaults leaves its residuals."""
    found = [i for i in graph.input if i.name == TEXT_ENCODER_MASK]
    if not found or found[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        return
    tokens = found[0].type.tensor_type.shape.dim[1].dim_value
    graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, tokens), np.int64), TEXT_ENCODER_MASK))


def export_component(
    component: str,
    pipe,
    folder: Path,
    facts: PipelineFacts,
    static: StaticShapes | None,
    opset: int,
    target: str,
    fp16: bool,
    extra_fp32_nodes: Sequence[str] = (),
    compare: bool = True,
) -> Written:
    """Trace, finish, write and check one component: the path every export takes (finish_component)."""
    traced = trace_component(component, pipe, folder, facts, static, opset, compare and checkable(target))
    return finish_component(traced, folder, target, fp16, bool(facts.upcast_attention), extra_fp32_nodes)
