"""fp16 by ONNX-level conversion of the fp32 export, with the fp32 rules written as data.

Every rule finds its nodes by graph structure (op types and how they connect), never by node names,
so it holds for the generic graph, for ORT's CPU fusions (cpu target) and for its CUDA fusions (cuda
target) alike, and for any size of the same architecture.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import replace

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from onnxruntime.transformers.float16 import convert_float_to_float16

from .graph_check import with_standard_stand_ins
from .graph_files import FP16_MAX_FINITE, FP16_MIN_POSITIVE, OnDisk
from .specs import graph_spec, spec_of

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


# -- Models trained in bfloat16: T5 (SD3's and Flux's text encoder) and the MMDiT transformers ---------
#
# bfloat16 has float32's range; fp16 stops at 65504. T5-XXL v1.1's feed-forward outputs and residual
# stream pass that, and so do Flux's residual stream in its single-stream blocks and the squares its
# norms take (ONNX Runtime's own SD3/Flux tooling keeps T5's SkipLayerNorms from block 10 on, the `wo`
# MatMuls of blocks 10 and 23, and Flux's single-block residual Adds and LayerNorms in fp32 or bf16,
# listed by node name for one export). The rules below keep the same kinds of nodes, found by structure
# in any graph of these models:
#
# 1. The residual stream: every Add that adds a branch to a tensor a norm reads (x + f(norm(x))), the
#    Concat and Slice that join the text and image streams and cut them apart again (Flux), and the
#    fused residual norms (Skip(Simplified)LayerNormalization). The stream is fp32 end to end: one
#    overflowing value would make every later block's output inf.
# 2. The norms that read the stream (LayerNormalization, RMSNorm in any of its forms): their input is
#    the fp32 stream, which cast to fp16 would overflow before the norm shrinks it.
# 3. Every decomposed RMSNorm's statistics (Pow, ReduceMean, Add eps, Sqrt, Reciprocal, and the Mul or
#    Div that normalizes): x^2 overflows fp16 once |x| > 256; diffusers' and transformers' RMSNorms
#    compute them in fp32 too, then scale by the weight in the model's dtype (that Mul stays fp16).
# 4. The gate Mul of a gated branch (Flux and SD3: x + gate * f(...)): the product itself can pass 65504.
# 5. The feed-forward's down projection when its output is added to the stream as it is (T5's `wo`,
#    fed by the gated activation's Mul or a Relu): its output passes 65504. Its weight stays fp32, as
#    the converter keeps initializers that only fp32 nodes read. The gated models' down projections
#    are not kept: their gate is (4), and their weights are the bulk of the model.
# 6. Integer arithmetic done in float: nodes between a Cast from an integer type and a Cast back to one
#    (T5's relative position buckets: the log of a distance, truncated to a bucket index). Rounded
#    through fp16, a bucket lands one off and the attention takes another row of its bias table.
#
# Not kept: the modulation Linear layers (AdaLayerNorm's shift/scale/gate: a quarter of Flux's weights),
# the attention scores, the MLP hidden activations. The timestep, guidance and RoPE position inputs
# stay float32 with their Sin/Cos paths (ComponentSpec.fp32_inputs, timestep_path): that keeps RoPE's
# application to q and k in fp32 too, as diffusers computes it; Flux's float64 rotary frequencies are
# left as they are (the converter changes float32 only).

BFLOAT16_TRAINED = {"t5", "mmdit"}  # ComponentSpec.fusion_model_type of the graphs the rules below serve

STREAM_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization"}  # normalize input 0
RESIDUAL_NORMS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}  # input 0 + input 1, then norm
STREAM_MOVES = {"Concat", "Slice"}
FFN_ACTIVATIONS = {"Mul", "Relu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu"}
RMS_STATISTICS = ("ReduceMean", "Add", "Sqrt")  # after Pow(x, 2), in this order
INTEGER_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


class GraphLinks:
    """Producers, consumers and constant values of one graph, for the rules below."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in set(node.input) - {""}:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        found = self.consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def scalar(self, name: str) -> float | None:
        tensor = self.constants.get(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        value = numpy_helper.to_array(tensor)
        return float(value.reshape(-1)[0]) if value.size == 1 else None


def rms_norms(graph: onnx.GraphProto, links: GraphLinks) -> dict[str, list[str]]:
    """Decomposed RMSNorms, x * 1/sqrt(mean(x^2) + eps) as traced (specs.traceable_rms_norm and
    transformers' T5LayerNorm): x's name -> the nodes from Pow(x, 2) to the Mul or Div that normalizes x."""
    found = {}
    for pow_node in graph.node:
        if pow_node.op_type != "Pow" or links.scalar(pow_node.input[1]) != 2.0:
            continue
        x, chain, current = pow_node.input[0], [pow_node.name], pow_node
        for op_type in RMS_STATISTICS:
            current = links.only_consumer(current.output[0], op_type)
            if current is None:
                break
            chain.append(current.name)
        if current is None:
            continue
        root = current.output[0]
        reciprocal = links.only_consumer(root, "Reciprocal")
        if reciprocal is not None:
            chain.append(reciprocal.name)
            root = reciprocal.output[0]
        wanted = "Mul" if reciprocal is not None else "Div"
        apply = next((n for n in links.consumers.get(root, []) if n.op_type == wanted and x in n.input), None)
        if apply is not None:
            found[x] = [*chain, apply.name]
    return found


def normalized_tensors(graph: onnx.GraphProto, rms: dict[str, list[str]]) -> set[str]:
    """The tensors some norm normalizes (LayerNorm's and RMSNorm's input, a residual norm's two inputs)."""
    normalized = set(rms)
    for node in graph.node:
        if node.op_type in STREAM_NORMS:
            normalized.add(node.input[0])
        elif node.op_type in RESIDUAL_NORMS:
            normalized.update(node.input[:2])
    return normalized


def residual_stream_nodes(graph: onnx.GraphProto, links: GraphLinks) -> list[str]:
    """Rules 1, 2, 4 and 5: the residual Adds and fused residual norms, the Concat/Slice the stream
    passes, the norms that read it, the gate Muls and ungated down projections that feed it."""
    rms = rms_norms(graph, links)
    normalized = normalized_tensors(graph, rms)
    kept, stream, branches = [], set(), []
    for node in graph.node:
        if node.op_type in RESIDUAL_NORMS:
            kept.append(node.name)
            stream.update(name for name in (*node.input[:2], *node.output[3:4]) if name)
            branches += node.input[:2]
        elif node.op_type == "Add" and not any(map(links.is_constant, node.input)):
            inputs = [name for name in node.input if name in normalized]
            if inputs:
                kept.append(node.name)
                stream.update([*inputs, node.output[0]])
                branches += [name for name in node.input if name not in inputs]
    for node in graph.node:  # topological: a Slice after a Concat sees the Concat's output in the stream
        if node.op_type in STREAM_MOVES and node.input[0] in stream:
            if node.op_type == "Slice" or all(name in stream for name in node.input):
                kept.append(node.name)
                stream.add(node.output[0])
    for node in graph.node:
        if node.op_type in STREAM_NORMS and node.input[0] in stream:
            kept.append(node.name)
    kept += [name for x, chain in rms.items() if x in stream for name in chain]
    return kept + branch_nodes(branches, links)


def branch_nodes(branches: Iterable[str], links: GraphLinks) -> list[str]:
    """Rules 4 and 5 for the tensors added to the stream: the gate Mul, or the down projection
    (MatMul, with its bias Add) whose input is an activation."""
    kept = []
    for name in branches:
        node = links.producer.get(name)
        if node is None:
            continue
        if node.op_type == "Mul":
            kept.append(node.name)
            continue
        bias = None
        if node.op_type == "Add" and any(map(links.is_constant, node.input)):
            bias, node = node, links.producer.get(next(n for n in node.input if not links.is_constant(n)))
        if node is None or node.op_type != "MatMul":
            continue
        source = links.producer.get(node.input[0])
        if source is not None and source.op_type in FFN_ACTIVATIONS:
            kept += [node.name] + ([bias.name] if bias is not None else [])
    return kept


def integer_float_nodes(graph: onnx.GraphProto, types: dict[str, int], links: GraphLinks) -> list[str]:
    """Rule 6: the float nodes on a path from a Cast of an integer to a float back to a Cast to an integer,
    with both Casts (the first must stay a Cast to float32, which the converter would make fp16)."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    starts = [
        n
        for n in graph.node
        if n.op_type == "Cast" and types.get(n.input[0]) in INTEGER_TYPES and _cast_to(n) in float_types
    ]
    reached, frontier = {n.name: n for n in starts}, [o for n in starts for o in n.output]
    while frontier:
        for node in links.consumers.get(frontier.pop(), []):
            if node.name in reached:
                continue
            reached[node.name] = node
            if not (node.op_type == "Cast" and _cast_to(node) in INTEGER_TYPES):
                frontier += [o for o in node.output if o]
    ends = [n for n in reached.values() if n.op_type == "Cast" and _cast_to(n) in INTEGER_TYPES]
    kept, stack = {}, list(ends)
    while stack:  # back from each Cast to an integer, within what the starts reach
        node = stack.pop()
        if node.name in kept:
            continue
        kept[node.name] = node
        if node in starts:
            continue
        stack += [p for p in (links.producer.get(i) for i in node.input) if p is not None and p.name in reached]
    return [n.name for n in graph.node if n.name in kept]


def bfloat16_trained_nodes(model: onnx.ModelProto) -> list[str]:
    """Rules 1 to 6 for one graph of a model trained in bfloat16."""
    graph = model.graph
    links = GraphLinks(graph)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *infer_value_types(model)]}
    types.update({t.name: t.data_type for t in graph.initializer})
    rms = [name for chain in rms_norms(graph, links).values() for name in chain]
    return [*residual_stream_nodes(graph, links), *rms, *integer_float_nodes(graph, types, links)]


def fp32_nodes(component: str, model: onnx.ModelProto, upcast_attention: bool) -> list[str]:
    """The nodes an fp16 export keeps in fp32, by the component's spec and the rules above."""
    spec = graph_spec(component, [o.name for o in model.graph.output])
    inputs = {i.name for i in model.graph.input}
    nodes = []
    for name in spec.fp32_inputs:
        if name in inputs:
            nodes += timestep_path(model.graph, name)
    if upcast_attention and spec.upcast_attention_scores:
        nodes += attention_score_nodes(model.graph)
    if spec.fusion_model_type in BFLOAT16_TRAINED:
        nodes += bfloat16_trained_nodes(model)
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


# rounds of ONNX inference and contrib-op typing: one per contrib op that follows another untyped one
TYPING_ROUNDS = 8
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def infer_value_types(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Type and shape of every intermediate value, as ONNX's inference finds them (any model size).

    ONNX types nothing after an op it does not know, and the converter places no Cast by an untyped
    value, so fp16 and fp32 nodes met there unconverted (a kept MatMul fed a FastGelu's fp16 output
    did not load). ORT's ONNX-domain ops (RMSNorm's SimplifiedLayerNormalization) are typed as their
    standard stand-ins; the outputs of its contrib ops (FastGelu, QuickGelu, FusedMatMul, the fused
    norms and attentions of the cpu and cuda targets) take the type of their first float input, as
    their kernels' type constraints say, and inference runs again from there."""
    light = with_standard_stand_ins(weightless_copy(model))
    for _ in range(TYPING_ROUNDS):
        light = onnx.shape_inference.infer_shapes(light)
        if not type_contrib_outputs(light.graph):
            break
    return list(light.graph.value_info)


def type_contrib_outputs(graph: onnx.GraphProto) -> bool:
    """Give the untyped float outputs of contrib-domain nodes their first float input's type; whether any was."""
    known = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    known.update({t.name: t.data_type for t in graph.initializer})
    added = False
    for node in graph.node:
        if node.domain in ("", "ai.onnx"):
            continue
        dtype = next((known[i] for i in node.input if known.get(i) in FLOAT_TYPES), None)
        for name in node.output:
            if dtype is not None and name and name not in known:
                graph.value_info.append(onnx.helper.make_tensor_value_info(name, dtype, None))
                known[name] = dtype
                added = True
    return added


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
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    original: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        up = producer.get(node.input[0])
        # only a round trip from fp32: the model's own Casts to float become Casts to fp16 of fp16 tensors
        # (the traced x.float() of Flux's rotary embedding on the cuda target)
        if (
            up is not None
            and up.op_type == "Cast"
            and _cast_to(up) == onnx.TensorProto.FLOAT16
            and types.get(up.input[0]) == onnx.TensorProto.FLOAT
        ):
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
