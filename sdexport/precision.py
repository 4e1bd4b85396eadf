"""fp16 by ONNX-level conversion of the fp32 export, with the fp32 rules written as data."""

from __future__ import annotations

import heapq
from dataclasses import replace

import onnx
from onnx.external_data_helper import uses_external_data
from onnxruntime.transformers.float16 import convert_float_to_float16

from .graph_files import FP16_MAX_FINITE, FP16_MIN_POSITIVE, OnDisk
from .specs import spec_of

# Which inputs stay float32 and whether attention scores may (ComponentSpec.fp32_inputs and
# .upcast_attention_scores) are per component; the rules below find the nodes they keep in fp32.

# The timestep embedding (Sin/Cos of up to 999 * frequencies) stays fp32 up to the first of these,
# as diffusers computes it; the projection after it runs in fp16.
TIMESTEP_PATH_STOPS = {"MatMul", "Gemm"}

# With `upcast_attention`, diffusers computes Q.K^T, its scaling and the softmax in fp32.
ATTENTION_SCORE_OPS = {"Mul", "Div", "Add", "Where", "Cast"}


def timestep_path(graph: onnx.GraphProto, input_name: str = "timestep") -> list[str]:
    """Nodes downstream of `timestep` up to (not including) the first MatMul/Gemm."""
    frontier = {input_name}
    blocked = []
    for node in graph.node:  # the exported graph is topologically sorted
        if node.op_type in TIMESTEP_PATH_STOPS or not frontier.intersection(node.input):
            continue
        blocked.append(node.name)
        frontier.update(name for name in node.output if name)  # "" is an omitted output, not a tensor
    return blocked


def attention_score_nodes(graph: onnx.GraphProto) -> list[str]:
    """Each Softmax, the scaling ops before it and the MatMul that makes the scores."""
    producer = {out: node for node in graph.node for out in node.output}
    blocked = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        blocked.append(node.name)
        current = producer.get(node.input[0])
        while current is not None and current.op_type in ATTENTION_SCORE_OPS:
            blocked.append(current.name)
            current = producer.get(current.input[0])
        if current is not None and current.op_type == "MatMul":
            blocked.append(current.name)
    return blocked


def fp32_nodes(component: str, model: onnx.ModelProto, upcast_attention: bool) -> list[str]:
    """The nodes an fp16 export keeps in fp32, by the component's spec and the rules above."""
    spec = spec_of(component)
    inputs = {i.name for i in model.graph.input}
    nodes = []
    for name in spec.fp32_inputs:
        if name in inputs:
            nodes += timestep_path(model.graph, name)
    if upcast_attention and spec.upcast_attention_scores:
        nodes += attention_score_nodes(model.graph)
    return list(dict.fromkeys(nodes))


def to_fp16(component: str, model: onnx.ModelProto | OnDisk, keep_fp32_nodes: list[str]) -> onnx.ModelProto | OnDisk:
    """Convert an fp32 model to fp16, keeping the given nodes and the fixed fp32 inputs in fp32.

    The converter places its Casts by the types in `value_info`: every value's type is inferred
    first, on a copy without the weights, so graphs over 2 GB get the same Casts as small ones.
    An OnDisk model's graph is converted alone: its external tensors are retyped without being
    read (convert_with_stand_ins), and the OnDisk names them so that save_model converts their
    data as it writes.
    """
    proto = model.model if isinstance(model, OnDisk) else model
    inferred = infer_value_types(proto)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred)
    converted, retyped = convert_with_stand_ins(component, proto, keep_fp32_nodes)
    converted = drop_fp16_round_trips(converted)
    # the converter appends some Casts after their readers (Resize's scales): ONNX wants producers first
    nodes = list(converted.graph.node)
    del converted.graph.node[:]
    converted.graph.node.extend(topological_order(nodes, converted.graph))
    return replace(model, model=converted, fp16=frozenset(retyped)) if isinstance(model, OnDisk) else converted


def convert_with_stand_ins(
    component: str, model: onnx.ModelProto, keep_fp32_nodes: list[str]
) -> tuple[onnx.ModelProto, set[str]]:
    """ORT's converter on a model whose value types are inferred, external fp32 weights left unread;
    returns the model and the external tensors it retyped to fp16.

    The converter reads each weight it converts for its shape (numpy_helper.to_array, which loads an
    external tensor into the proto, from the working folder). Each external fp32 weight is a
    one-value stand-in while it converts: the converter decides from names and readers alone, so the
    stand-ins get the same Casts, whose value_info then gets the weight's real shape back.
    """
    external = {
        i: onnx.TensorProto.FromString(tensor.SerializeToString())
        for i, tensor in enumerate(model.graph.initializer)
        if uses_external_data(tensor) and tensor.data_type == onnx.TensorProto.FLOAT
    }
    for i, tensor in external.items():
        model.graph.initializer[i].CopyFrom(onnx.helper.make_tensor(tensor.name, tensor.data_type, [1], [0.0]))
    inputs = {i.name for i in model.graph.input}
    converted = convert_float_to_float16(
        model,
        min_positive_val=FP16_MIN_POSITIVE,
        max_finite_val=FP16_MAX_FINITE,
        keep_io_types=[name for name in spec_of(component).fp32_inputs if name in inputs],
        node_block_list=keep_fp32_nodes,
        disable_shape_infer=True,  # done by the caller; the converter's own in-memory inference stops at 2 GB
    )
    retyped = set()
    for i, tensor in external.items():  # the converter retypes initializers in place, in their order
        tensor.data_type = converted.graph.initializer[i].data_type
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            retyped.add(tensor.name)
        converted.graph.initializer[i].CopyFrom(tensor)
    dims = {tensor.name: tensor.dims for tensor in external.values()}
    cast_dims = {
        n.output[0]: dims[n.input[0]] for n in converted.graph.node if n.op_type == "Cast" and n.input[0] in dims
    }
    for value in converted.graph.value_info:
        if value.name in cast_dims:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for size in cast_dims[value.name]:
                shape.dim.add().dim_value = size
    return converted, retyped


# Initializers larger than this are replaced by a typed, shaped stub for inference; smaller ones
# (shape vectors, axes, scalars) keep their values, which inference reads to propagate shapes.
STUB_MIN_BYTES = 4096


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers reduced to name, type and dims (data marked external)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        stub = graph.initializer.add()
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.ByteSize() < STUB_MIN_BYTES:
            stub.CopyFrom(tensor)
            continue
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="weights-not-loaded")
    return light


def infer_value_types(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Type and shape of every intermediate value, as ONNX's inference finds them (any model size)."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model))
    return list(inferred.graph.value_info)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def drop_fp16_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let fp32 nodes that feed fp32 nodes pass the fp32 tensor directly.

    ORT's converter casts to fp16 and back around every kept node, so a chain of kept nodes
    (the timestep's Sin/Cos path) still rounds through fp16, and an overflowing tensor stays Inf
    however many nodes are kept. A Cast(fp16 -> fp32) of a Cast(fp32 -> fp16) reads the original.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    original: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        up = producer.get(node.input[0])
        if up is not None and up.op_type == "Cast" and _cast_to(up) == onnx.TensorProto.FLOAT16:
            original[node.output[0]] = up.input[0]
    outputs = {o.name for o in graph.output}
    original = {k: v for k, v in original.items() if k not in outputs}
    if not original:
        return model
    nodes = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in original)]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in original:
                node.input[i] = original[name]
    used = {name for n in nodes for name in n.input} | outputs
    nodes = [
        n
        for n in nodes
        if not (n.op_type == "Cast" and _cast_to(n) == onnx.TensorProto.FLOAT16 and not set(n.output) & used)
    ]
    del graph.node[:]
    graph.node.extend(topological_order(nodes, graph))
    return model


def topological_order(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes sorted so each comes after its inputs' producers (the converter appends its Casts);
    Kahn's algorithm, keeping the given order among nodes that are ready together."""
    # "" names an omitted optional input or output (Resize's roi, SkipLayerNormalization's mean): no edge
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)
    consumers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(node.input) - {""}:
            if name in producer and producer[name] != i:
                waiting[i] += 1
                consumers.setdefault(producer[name], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for j in consumers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(ordered) != len(nodes):  # a cycle cannot come from the converter; keep the input order
        return nodes
    return ordered
