"""Run a graph too large for one ONNX Runtime session on this machine, in pieces: its nodes, in their
(topological) order, cut into chunks of at most `max_bytes` of weights, each chunk a model of its own that
references the same external data file, run one after another with the values that cross the cuts.

Why: the CPU EP computes fp16 MatMuls in fp32 copies of their weights, so a session of T5-XXL's 9.5 GB fp16
graph peaks at 16 GiB (19.8 with its memory arena); a chunk holds a few layers' weights and their copies.
The numbers are the same as one session's: the same kernels run on the same values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from sdruntime.ort_options import ort_session_options

from .precision import infer_value_types

CHUNK_BYTES = 2 << 30  # weights per chunk


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The stored size of an initializer: its external data's length, or its data in the proto."""
    external = {entry.key: entry.value for entry in tensor.external_data}
    return int(external["length"]) if "length" in external else tensor.ByteSize()


def needed_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes the outputs need, each placed just before the first node that reads it (a post-order walk
    from the outputs): a weight's Transpose or Cast then sits beside its MatMul, not at the start of the
    graph, where ORT's passes may have put it, which would carry every weight across every cut."""
    producer = {out: node for node in graph.node for out in node.output if out}
    order, done = [], set()
    for output in graph.output:
        stack = [(producer[output.name], False)] if output.name in producer else []
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((producer[name], False) for name in reversed(node.input) if name in producer)
    return order


def chunks_of(graph: onnx.GraphProto, max_bytes: int) -> list[list[onnx.NodeProto]]:
    """The nodes in needed_order, cut after the node that brings a chunk's weights past `max_bytes`."""
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    chunks, current, held, seen = [], [], 0, set()
    for node in needed_order(graph):
        current.append(node)
        held += sum(sizes[name] for name in set(node.input) - seen if name in sizes)
        seen.update(node.input)
        if held >= max_bytes:
            chunks.append(current)
            current, held, seen = [], 0, set()
    return [*chunks, current] if current else chunks


def chunk_model(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], live: dict[str, np.ndarray], wanted: set[str], types: dict
) -> onnx.ModelProto:
    """A model of `nodes` whose inputs are the `live` values they read, whose outputs are the values they make
    that `wanted` names, and whose initializers are the ones they read (external data left where it is)."""
    made = {out for node in nodes for out in node.output if out}
    read = {name for node in nodes for name in node.input if name}
    initializers = [t for t in model.graph.initializer if t.name in read]
    inputs = [
        onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(live[name].dtype), None)
        for name in sorted(read - made - {t.name for t in initializers})
    ]
    outputs = [types[name] for name in sorted(made & wanted)]
    graph = onnx.helper.make_graph(nodes, "chunk", inputs, outputs, initializers)
    chunk = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    chunk.functions.extend(model.functions)
    return chunk


def chunked_outputs(
    model_path: Path, inputs: dict[str, np.ndarray], provider: str, max_bytes: int = CHUNK_BYTES
) -> list[np.ndarray]:
    """The graph's outputs for `inputs`, run one chunk at a time (ORT's optimizations and memory arena off)."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    types = {v.name: v for v in [*infer_value_types(model), *graph.output]}
    chunks = chunks_of(graph, max_bytes)
    outputs = [o.name for o in graph.output]
    declared = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.input}
    live = {name: value.astype(declared[name]) for name, value in inputs.items() if name in declared}
    for k, nodes in enumerate(chunks):
        later = {name for rest in chunks[k + 1 :] for node in rest for name in node.input} | set(outputs)
        chunk = chunk_model(model, nodes, live, later, types)
        path = model_path.parent / f".chunk-{k}.onnx"  # beside the graph: its external data paths hold
        onnx.save_model(chunk, str(path))
        try:
            options = ort_session_options("disable", prepacking=False, cpu_mem_arena=False)
            session = ort.InferenceSession(str(path), options, providers=[provider])
        finally:
            path.unlink()
        feeds = {i.name: live[i.name] for i in session.get_inputs()}
        live.update(zip((o.name for o in session.get_outputs()), session.run(None, feeds)))
        del session
        live = {name: value for name, value in live.items() if name in later}
    return [live[name] for name in outputs]
