"""The first node of a failing fp16 component to leave tolerance, found by comparing every intermediate
tensor of the fp16 file with a fresh fp32 export of the source on one failing case."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from sdruntime.manifest import Manifest

from ..graph_files import save_model
from ..trace import trace_component
from .cases import Case, full_inputs
from .components import feeds_for, open_session
from .metrics import FP16_MAX, error_metrics
from .report import Blame

SHAPE_OPS = {"Shape", "Size"}  # they read a tensor's shape, never its values


def trace_fp32(component: str, pipe, manifest: Manifest) -> onnx.ModelProto:
    """A fresh fp32 export of the component, before any optimization: the graph `to_fp16` converts."""
    with tempfile.TemporaryDirectory(prefix="sdexport-trace-") as tmp:
        traced = trace_component(component, pipe, Path(tmp), manifest.pipeline, manifest.static, int(manifest.opset))
        return onnx.load(str(traced.path), load_external_data=True)


def all_tensor_values(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], folder: Path, manifest: Manifest, providers: list
) -> dict[str, np.ndarray]:
    """Run `model` with every float intermediate tensor exposed as a graph output (values as float32)."""
    path = folder / "model.onnx"
    save_model(model, path)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))  # works on > 2 GB models too
    typed = onnx.load(str(path), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    exposed = {o.name for o in typed.graph.output}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    for node in typed.graph.node:
        for name in node.output:
            if name and name not in exposed and types.get(name) in floats:
                typed.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                exposed.add(name)
    onnx.save(typed, str(path))
    session = open_session(path, manifest, providers)
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    return {n: v.astype(np.float32) for n, v in zip(names, values) if v.dtype.kind == "f"}


def value_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose values reach the outputs: consumed by something other than Shape/Size, or graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type not in SHAPE_OPS:
            used.update(node.input)
    return used


def first_divergence(
    graph: onnx.GraphProto, reference: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float
) -> tuple[onnx.NodeProto, str] | None:
    """(fp16 node, tensor) of the first output, in topological order, that overflows or leaves rtol."""
    used = value_tensors(graph)
    compared = [
        (node, name)
        for node in graph.node
        for name in node.output
        if name in used and name in reference and name in got and reference[name].shape == got[name].shape
    ]
    overflow = next(
        ((n, t) for n, t in compared if not np.isfinite(got[t]).all() and np.isfinite(reference[t]).all()), None
    )
    if overflow is not None:  # NaN/Inf spreads: the first one is the culprit, not the first inexact tensor
        return overflow
    return next(((n, t) for n, t in compared if (error_metrics(reference[t], got[t]).relative_l2 or 0) > rtol), None)


def out_of_fp16_range(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> list[str]:
    """Nodes that produce or consume a tensor beyond fp16's range (65504) in the fp32 run, in graph order."""
    big = {name for name, v in values.items() if v.size and np.isfinite(v).all() and np.abs(v).max() > FP16_MAX}
    big |= {
        init.name
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and np.abs(numpy_helper.to_array(init)).max(initial=0) > FP16_MAX
    }
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in SHAPE_OPS and (big.intersection(node.input) or big.intersection(node.output))
    ]


def locate_fp16_failure(component: str, pipe, manifest: Manifest, case: Case, rtol: float, providers: list) -> Blame:
    """Compare every intermediate tensor of the fp16 file with a fresh fp32 export on one failing case."""
    fp32 = trace_fp32(component, pipe, manifest)
    fp16 = onnx.load(str(manifest.model_path(component)))
    with tempfile.TemporaryDirectory(prefix="sdexport-locate-") as tmp:
        fp32_feeds = full_inputs(manifest, component, case)  # a fresh trace has no residual defaults
        reference = all_tensor_values(fp32, fp32_feeds, Path(tmp) / "fp32", manifest, providers)
        fp16_feeds = feeds_for(manifest, component, case.inputs)
        got = all_tensor_values(fp16, fp16_feeds, Path(tmp) / "fp16", manifest, providers)
    found = first_divergence(fp16.graph, reference, got, rtol)
    if found is None:
        return Blame(case=case.label)
    fp16_node, tensor = found
    producer = next((n for n in fp32.graph.node if tensor in n.output), None)
    peak = float(np.abs(reference[tensor]).max()) if reference[tensor].size else 0.0
    kept = set(manifest.components[component].fp32_nodes)
    region = [n for n in out_of_fp16_range(fp32, reference) if n not in kept]
    own = [producer.name] if producer is not None and producer.name not in kept else []
    named = producer if producer is not None else fp16_node
    return Blame(
        case=case.label,
        node=named.name,
        fp16_node=fp16_node.name,
        op_type=named.op_type,
        tensor=tensor,
        metrics=error_metrics(reference[tensor], got[tensor]),
        fp32_max_value=peak,
        out_of_fp16_range=peak > FP16_MAX,
        suggested_fp32_nodes=tuple(region if peak > FP16_MAX and region else own),
    )
