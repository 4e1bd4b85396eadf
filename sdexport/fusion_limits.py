"""The CUDA kernels' limits on what ONNX Runtime's Stable Diffusion fusions emit, and the way back.

ORT's fusion scripts (`onnxruntime.transformers.optimizer`, model types unet, vae, clip, t5 and mmdit) fuse by
pattern and never ask whether the CUDA kernel of the fused op accepts the shapes: a U-Net whose
feed-forward is 1024 wide gets a BiasSplitGelu that fails at its first run ("hidden size should be
2560, 5120, 6144, 10240 or 12288, got 1024"). This module writes those limits as data (`LIMITS`),
finds the fused nodes whose kernel would refuse them (`refused_nodes`), and replaces each by the
standard ONNX ops it stands for (`decompose`). `keep_within_limits` does both and records what it
left unfused, and why, in the model's metadata (`UNFUSED_KEY`) for `sdexport inspect`.

Why replace after fusing instead of not fusing: ORT's `FusionOptions` switch a fusion on or off for
the whole graph, so one refused BiasSplitGelu would cost every accepted one; stopping single nodes
would mean patching ORT's private fusion classes, which change between releases. The replacements
compute what the matched subgraphs computed (GroupNorm goes back to the Reshape /
InstanceNormalization / Reshape pattern diffusers exports, whose CUDA kernel keeps its statistics in
fp32 for fp16 inputs), so the result equals the unfused graph; the tests check that on the CPU EP.

Where the limits come from: the CUDA kernels' source in microsoft/onnxruntime
(onnxruntime/contrib_ops/cuda/..., read at main of February 2026, VERSION_NUMBER 1.25.0, the newest
source at hand), each limit checked against the error strings compiled into
libonnxruntime_providers_cuda.so of onnxruntime-gpu 1.31.1 (the newest CUDA build on PyPI; the
strings there match this source: BiasSplitGelu's five sizes, no channel check in BiasAdd). Paths
below are relative to onnxruntime/contrib_ops/cuda/ unless they say otherwise.

- Runtime dimensions: every limit here depends on widths the weights fix (channels, heads, head
  size), never on batch, height, width or sequence length. Where a width is not fixed by the graph
  (no initializer or constant shape to read it from), the node is refused: left unfused costs speed,
  a refusal at run time costs the export.
- MultiHeadAttention picks its kernel at run time (GPU generation, sequence length, fp16 or fp32):
  the TensorRT fused kernels read packed QKV/KV as they are, every other kernel unpacks them first,
  and that unpacking refuses wide heads. The check assumes the unpacking runs (conservative).
- dtype: none of these limits differs between fp16 and fp32 (the unpacking uses 4-wide vectors for
  both; only bfloat16, which no export here emits, would differ); kernel choice does, refusals do not.
- The CPU EP has no kernel for NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu or BiasAdd, and its
  MultiHeadAttention refuses packed QKV/KV ("Packed QKV of shape (B, L, N, 3, H) not implemented for
  CPU"); that does not matter here, as the runtime refuses cuda exports on the CPU EP and ORT places
  these nodes on the CUDA EP, which registers them for fp16 and fp32.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import SdexportError

UNFUSED_KEY = "sdexport.unfused"  # metadata_props key: JSON list of {node, op, reason}
CONTRIB_DOMAIN = "com.microsoft"

# cudaDeviceProp.maxThreadsPerBlock: 1024 on every CUDA GPU since compute capability 2.0; the kernels
# read it as `device_prop.maxThreadsPerBlock` (max_threads_per_block below).
MAX_THREADS_PER_BLOCK = 1024

BIAS_SPLIT_GELU_HIDDEN_SIZES = (2560, 5120, 6144, 10240, 12288)

# diffusion/group_norm_common_base.h: constexpr static int kSizes[] = {128, 256, 320, 384, 512};
GROUP_NORM_SIZES = (128, 256, 320, 384, 512)
GROUP_NORM_MAX_SIZE = GROUP_NORM_SIZES[-1]  # kMaxSize = kSizes[kNumOfSizes - 1]
GROUP_NORM_CHANNELS_PER_THREAD = 2  # constexpr static int32_t CHANNELS_PER_THREAD = 2;


def group_norm_channels_per_block(channels: int, groups: int) -> int:
    """GetChannelsPerBlock and FindChannelsPerBlock of diffusion/group_norm_common_base.cc, line for line."""
    per_group = channels // groups
    if per_group >= GROUP_NORM_MAX_SIZE // 2:
        return per_group
    min_cost, best = -1, -1
    for size in reversed(GROUP_NORM_SIZES):
        if size < per_group:
            break
        per_block = size // per_group * per_group
        blocks = (channels + per_block - 1) // per_block
        cost = blocks * size - channels
        if cost == 0:
            return per_block
        if min_cost == -1 or cost < min_cost:
            min_cost, best = cost, per_block
    return best


def group_norm_launches(channels: int, groups: int) -> bool:
    """The check LaunchGroupNormKernel makes before it launches (diffusion/group_norm_impl.cu)."""
    per_group = channels // groups
    per_block = group_norm_channels_per_block(channels, groups)
    return not (
        per_block % per_group != 0 or per_block > GROUP_NORM_MAX_SIZE or per_group % GROUP_NORM_CHANNELS_PER_THREAD != 0
    )


def unpacked_head_threads(head_size: int) -> int:
    """Threads per head of the packed QKV/KV unpacking: LaunchAddBiasTranspose (bert/add_bias_transpose.cu)
    moves 4 values a thread when head_size % 4 == 0 (Half4 for fp16 with enable_half4, float4 for fp32),
    2 when it is even (half2/float2), else 1."""
    if head_size % 4 == 0:
        return head_size // 4
    if head_size % 2 == 0:
        return head_size // 2
    return head_size


@dataclass(frozen=True)
class Limit:
    """One condition a CUDA kernel needs: `holds(facts)` must be true; `needs` names the facts it reads."""

    rule: str  # the condition, in words
    message: str  # why a node fails it, formatted with the node's facts
    needs: tuple[str, ...]
    holds: Callable[[dict], bool]
    source: str  # the file that checks it


# Per fused op type: the kernel's conditions that a fusion can break by width. Structural checks that
# hold by construction of the fusions (input ranks, bias lengths equal to the last dimension, skip
# shapes) are not repeated. An empty entry is an op whose CUDA kernel was read and has no such limit.
LIMITS: dict[str, tuple[Limit, ...]] = {
    "BiasSplitGelu": (
        # diffusion/bias_split_gelu.cc, ComputeInternal:
        #   if (input_dims[2] != 2560 && input_dims[2] != 5120 && input_dims[2] != 6144 &&
        #       input_dims[2] != 10240 && input_dims[2] != 12288) {
        #     return ORT_MAKE_STATUS(ONNXRUNTIME, INVALID_ARGUMENT,
        #         "hidden size should be 2560, 5120, 6144, 10240 or 12288, got ", input_dims[2]);
        # (ORT 1.16 and older: 2560, 5120 or 10240 only; 6144 and 12288 came with SD XL's refiner)
        Limit(
            "hidden size is 2560, 5120, 6144, 10240 or 12288",
            "hidden size {hidden_size} is not 2560, 5120, 6144, 10240 or 12288",
            ("hidden_size",),
            lambda f: f["hidden_size"] in BIAS_SPLIT_GELU_HIDDEN_SIZES,
            "diffusion/bias_split_gelu.cc",
        ),
    ),
    # diffusion/bias_add.cc checks only ranks and that bias and skip match the input
    # ("The input is expected to have 3 dimensions", "Number of channels in the last dimension of input
    # and bias are not the same", "Shape of input and skip (residual) shall be the same"). Its old
    # `input_dims[2] != 320 && != 640 && != 1280` refusal went with "[CUDA/ROCm] Remove limitation of
    # BiasAdd" (#17848, ORT 1.17); the 1.31.1 build has no such string. Other widths take
    # BiasAddLargeKernel (diffusion/bias_add_impl.cu).
    "BiasAdd": (),
    # diffusion/nhwc_conv.cc registers onnxruntime::cuda::Conv<T, true> (core/providers/cuda/nn/conv.cc):
    # ONNX Conv's own shape rules (conv_attrs_.ValidateInputShape) and cuDNN's choice of algorithm;
    # no width limit.
    "NhwcConv": (),
    "GroupNorm": (
        # diffusion/group_norm.cc, ComputeInternal:
        #   if (!channels_last_) return ORT_MAKE_STATUS(ONNXRUNTIME, NOT_IMPLEMENTED,
        #                                               "only the channels_last layout is supported");
        Limit(
            "channels_last layout",
            "channels_last is 0 (the CUDA kernel is channels-last only)",
            ("channels_last",),
            lambda f: f["channels_last"] != 0,
            "diffusion/group_norm.cc",
        ),
        #   if (!gamma->IsDataType<float>() || !beta->IsDataType<float>()) return ORT_MAKE_STATUS(
        #       ONNXRUNTIME, NOT_IMPLEMENTED, "GroupNorm only supports gamma and beta in float type");
        Limit(
            "gamma and beta in float",
            "gamma or beta is not float32",
            ("float_affine",),
            lambda f: f["float_affine"] == 1,
            "diffusion/group_norm.cc",
        ),
        # GroupNorm::GroupNorm: ORT_ENFORCE(activation == 0 || activation == 1);  // 0 is None, 1 is Swish
        Limit(
            "activation 0 (none) or 1 (swish)",
            "activation {activation} is not 0 or 1",
            ("activation",),
            lambda f: f["activation"] in (0, 1),
            "diffusion/group_norm.cc",
        ),
        #   if (num_channels % num_groups_ != 0) return ORT_MAKE_STATUS(ONNXRUNTIME, INVALID_ARGUMENT,
        #       "number of channels should be divisiable by num_groups");
        Limit(
            "channels divisible by groups",
            "{channels} channels do not divide into {groups} groups",
            ("channels", "groups"),
            lambda f: f["groups"] > 0 and f["channels"] % f["groups"] == 0,
            "diffusion/group_norm.cc",
        ),
        # diffusion/group_norm_impl.cu, LaunchGroupNormKernel:
        #   if (params.channels_per_block % params.channels_per_group != 0 ||
        #       params.channels_per_block > kMaxSize ||
        #       (params.channels_per_group % CHANNELS_PER_THREAD != 0)) {
        #     return ORT_MAKE_STATUS(ONNXRUNTIME, NOT_IMPLEMENTED,
        #         "GroupNorm in CUDA does not support the input: n=", ..., " groups=", num_groups);
        # with channels_per_block from GetChannelsPerBlock (group_norm_common_base.cc): in effect the
        # channels per group must be even and at most 512.
        Limit(
            "channels per group even and at most 512 (the kernel's launch check)",
            "{channels} channels in {groups} groups: {per_group} per group (the kernel needs an even "
            "number, at most 512)",
            ("channels", "groups"),
            lambda f: (
                f["groups"] <= 0 or f["channels"] % f["groups"] != 0 or group_norm_launches(f["channels"], f["groups"])
            ),
            "diffusion/group_norm_impl.cu",
        ),
    ),
    "MultiHeadAttention": (
        # contrib_ops/cpu/bert/multihead_attention_helper.h, CheckInputs (called by bert/multihead_attention.cc
        # with device_prop.maxThreadsPerBlock):
        #   if (max_threads_per_block > 0 && num_heads > max_threads_per_block) {
        #     return ORT_MAKE_STATUS(ONNXRUNTIME, INVALID_ARGUMENT, "num_heads should be no larger than ", ...);
        Limit(
            "at most 1024 heads",
            "{num_heads} heads (at most 1024)",
            ("num_heads",),
            lambda f: f["num_heads"] <= MAX_THREADS_PER_BLOCK,
            "../cpu/bert/multihead_attention_helper.h",
        ),
        # Packed QKV [B, S, N, 3, H] and packed KV [B, L, N, 2, H]: unless the TensorRT fused kernel
        # (fp16, some GPUs, some head sizes and lengths) or TensorRT fused cross attention reads them
        # packed, PrepareQkv_MHA_PackedQKV / PrepareQkv_MHA_PackedKV (bert/attention_prepare_qkv.cu)
        # unpack them with LaunchAddBiasTranspose format 4 (flash, memory-efficient and cuDNN
        # attention) or 5 (the unfused kernel), and InvokeAddBiasTranspose (bert/add_bias_transpose.cu):
        #   if (qk_head_size * num_heads <= max_threads_per_block) { ... }  // qk_head_size in vectors
        #   else { ... } else if (format == 4) {
        #     ORT_THROW("AddBiasTranspose (format 4) not implemented for hidden_size > max_threads_per_block");
        #   } else if (format == 5) {
        #     ORT_THROW("AddBiasTranspose (format 5) not implemented for hidden_size > max_threads_per_block");
        # Separate Q, K, V take format 0, which has a large-size kernel: no limit there.
        Limit(
            "packed QKV/KV unpack with at most 1024 threads (heads x head size / vector width)",
            "packed {packing} of {num_heads} heads of size {head_size} needs {unpack_threads} threads "
            "per block to unpack (at most 1024)",
            ("unpack_threads",),
            lambda f: f["unpack_threads"] <= MAX_THREADS_PER_BLOCK,
            "bert/add_bias_transpose.cu",
        ),
    ),
    # bert/skip_layer_norm.cc: skip_layer_norm_helper::CheckInputs (../cpu/skip_layer_norm_helper.h)
    # checks ranks and that skip, gamma, beta and bias match the input; LaunchSkipLayerNormKernel
    # (bert/skip_layer_norm_impl.cu) has a generic kernel for every width.
    "SkipLayerNormalization": (),
    # bert/skip_layer_norm.cc registers SkipSimplifiedLayerNormalization (T5's residual RMSNorm, from the
    # t5 fusions) as the same kernel class, SkipLayerNorm<T, Simplified=true>: the same checks, no beta.
    "SkipSimplifiedLayerNormalization": (),
    # bert/relative_attn_bias.cc (T5's relative position bias, from the t5 fusions): the bias table's
    # [buckets, heads] read from its shape; LaunchRelPosAttnBiasKernel (bert/relative_attn_bias_impl.cu)
    # launches one thread per (query, key) pair up to max_threads_per_block, a grid of them beyond:
    # every sequence length and head count runs. The buckets are computed in float (logf) there.
    "RelativePositionBias": (),
    # activation/activations.cc (QuickGelu), bert/fast_gelu.cc and math/bias_gelu.cc: elementwise;
    # bias_gelu_helper::CheckInputs only asks for a 1-D bias matching the last dimension.
    "QuickGelu": (),
    "FastGelu": (),
    "BiasGelu": (),
    "Gelu": (),
    "Attention": (
        # contrib_ops/cpu/bert/attention_base.cc, CheckInputs (called by bert/attention.cc with
        # device_prop.maxThreadsPerBlock): ... "num_heads should be no larger than ", max_threads_per_block.
        # Its QKV layouts (LaunchAddBiasTranspose formats 1, 2 and 3) have large-size kernels when the
        # Q/K and V head sizes are equal, as every CLIP attention has.
        Limit(
            "at most 1024 heads",
            "{num_heads} heads (at most 1024)",
            ("num_heads",),
            lambda f: f["num_heads"] <= MAX_THREADS_PER_BLOCK,
            "../cpu/bert/attention_base.cc",
        ),
    ),
}
# SkipGroupNorm is GroupNorm's kernel class (diffusion/group_norm.cc registers both) with a skip input.
LIMITS["SkipGroupNorm"] = LIMITS["GroupNorm"]
# LayerNormalization, which the fusions emit in the standard domain, has no width limit either
# (core/providers/cuda/nn/layer_norm.cc checks its axis and epsilon attributes only), nor has ORT's
# SimplifiedLayerNormalization (RMSNorm), which the same file registers in the ONNX domain
# (LayerNorm<T, U, V, simplified=true>) for the t5 and mmdit fusions.


@dataclass(frozen=True)
class Refusal:
    """A fused node that its CUDA kernel would refuse, and why."""

    node: str
    op: str
    reason: str

    def as_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "reason": self.reason}


class GraphIndex:
    """What the checks and replacements read from a graph: producers, initializers, constant values, shapes."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.initializer = {t.name: t for t in graph.initializer}
        self.shapes: dict[str, list[int | None]] = {}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                self.shapes[value.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
                ]
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def dims(self, name: str) -> list[int] | None:
        """An initializer's dims (read without its data, which may still be on disk)."""
        tensor = self.initializer.get(name)
        return list(tensor.dims) if tensor is not None else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a small constant: an initializer or a Constant node's output; None when unknown."""
        try:
            if name in self.initializer:
                return numpy_helper.to_array(self.initializer[name])
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant" and node.attribute:
                value = helper.get_attribute_value(node.attribute[0])
                return numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.asarray(value)
        except (OSError, ValueError, TypeError):  # external data not readable from here
            return None
        return None

    def shape_of(self, name: str) -> list[int | None] | None:
        """A tensor's shape: from a Reshape whose target is constant, else from value infos."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Reshape":
            target = self.constant(node.input[1])
            # [0, 0, N, 3, H] and the like: the leading dims are copied or batch-sized, the rest fixed
            if target is not None and target.ndim == 1 and len(target) >= 3 and all(v > 0 for v in target[2:]):
                return [None, None, *[int(v) for v in target[2:]]]
        return self.shapes.get(name)

    def last_dim(self, name: str) -> int | None:
        """A tensor's last dimension: from its shape, or from the weight of the MatMul that makes it."""
        shape = self.shape_of(name)
        if shape and shape[-1]:
            return shape[-1]
        node = self.producer.get(name)
        if node is not None and node.op_type == "MatMul":
            weight = self.dims(node.input[1])
            if weight:
                return weight[-1]
        return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return helper.get_attribute_value(found) if found is not None else default


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def attention_layout(node: onnx.NodeProto) -> str:
    """MultiHeadAttention's QKV form: "QKV" (packed [B, S, N, 3, H]), "KV" (packed [B, L, N, 2, H]) or "Q_K_V"."""
    key, value = _input(node, 1), _input(node, 2)
    if not key and not value:
        return "QKV"
    return "KV" if key and not value else "Q_K_V"


def node_facts(node: onnx.NodeProto, index: GraphIndex) -> dict:
    """The widths and attributes the limits read; None where the graph does not fix them."""
    op = node.op_type
    if op == "BiasSplitGelu":
        bias = index.dims(node.input[1])
        return {"hidden_size": bias[0] if bias and len(bias) == 1 else index.last_dim(node.input[0])}
    if op in ("GroupNorm", "SkipGroupNorm"):
        gamma, beta = index.initializer.get(node.input[1]), index.initializer.get(node.input[2])
        floats = (
            None
            if gamma is None or beta is None
            else int(gamma.data_type == TensorProto.FLOAT and beta.data_type == TensorProto.FLOAT)
        )
        channels = index.dims(node.input[1])
        groups = _attr(node, "groups")
        channels = channels[0] if channels and len(channels) == 1 else None
        per_group = channels // groups if channels is not None and groups else None
        return {
            "channels_last": _attr(node, "channels_last", 1),
            "float_affine": floats,
            "activation": _attr(node, "activation"),
            "channels": channels,
            "groups": groups,
            "per_group": per_group,
        }
    if op in ("MultiHeadAttention", "Attention"):
        heads = _attr(node, "num_heads")
        facts = {"num_heads": heads}
        if op == "MultiHeadAttention":
            layout = attention_layout(node)
            packed_input = {"QKV": node.input[0], "KV": _input(node, 1)}.get(layout)
            head_size = None
            if packed_input:
                shape = index.shape_of(packed_input)
                head_size = shape[4] if shape and len(shape) == 5 else None
            else:
                width = index.last_dim(node.input[0])
                head_size = width // heads if width and heads else None
            threads = heads * unpacked_head_threads(head_size) if heads and head_size else None
            # separate Q, K and V are not unpacked: no thread count to check
            facts.update(packing=layout, head_size=head_size, unpack_threads=threads if packed_input else 0)
        return facts
    return {}


def check_node(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Why `node`'s CUDA kernel would refuse it (the first limit it breaks), or None when it is accepted."""
    limits = LIMITS.get(node.op_type, ()) if node.domain == CONTRIB_DOMAIN else ()
    if not limits:
        return None
    facts = node_facts(node, index)
    for limit in limits:
        unknown = [name for name in limit.needs if facts.get(name) is None]
        if unknown:
            return (
                f"{', '.join(unknown)} not fixed by the graph, so '{limit.rule}' cannot be checked: "
                f"left unfused to be safe ({limit.source})"
            )
        if not limit.holds(facts):
            return f"{limit.message.format(**facts)} ({limit.source})"
    return None


def refused_nodes(model: onnx.ModelProto) -> list[Refusal]:
    """The fused nodes of `model` that their CUDA kernel would refuse, in graph order."""
    index = GraphIndex(model)
    refusals = []
    for node in model.graph.node:
        reason = check_node(node, index)
        if reason is not None:
            refusals.append(Refusal(node.name, node.op_type, reason))
    return refusals


# ---------------------------------------------------------------------------------------------
# Replacements: each fused op as the standard ONNX ops it stands for.


class _Subgraph:
    """Nodes and constants replacing one fused node; names derive from the fused node's, so they are unique."""

    def __init__(self, node: onnx.NodeProto, index: GraphIndex, position: int):
        self.prefix = f"{node.name or node.op_type + str(position)}/unfused"
        self.index = index
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> list[str]:
        tag = f"{self.prefix}/{op_type}_{len(self.nodes)}"
        names = outputs if isinstance(outputs, list) else [f"{tag}_out{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=tag, **attrs))
        return names

    def one(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, [output] if output else 1, **attrs)[0]

    def const(self, tag: str, value) -> str:
        array = np.asarray(value)
        name = f"{self.prefix}/{tag}"
        self.constants.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, tag: str, values: Iterable[int]) -> str:
        return self.const(tag, np.asarray(list(values), dtype=np.int64))

    def floats(self, tag: str, value) -> str:
        return self.const(tag, np.asarray(value, dtype=np.float32))

    def split(self, x: str, axis: int, sizes: list[int]) -> list[str]:
        if self.index.opset >= 13:
            return self.op("Split", [x, self.ints(f"split_{len(self.nodes)}", sizes)], len(sizes), axis=axis)
        return self.op("Split", [x], len(sizes), axis=axis, split=sizes)

    def squeeze(self, x: str, axes: list[int]) -> str:
        if self.index.opset >= 13:
            return self.one("Squeeze", [x, self.ints(f"axes_{len(self.nodes)}", axes)])
        return self.one("Squeeze", [x], axes=axes)


def _bias_split_gelu(g: _Subgraph, node: onnx.NodeProto) -> None:
    """Y = A[..., :D] * gelu(A[..., D:]) with A = X + bias (gelu by erf, as the kernel computes it)."""
    width = node_facts(node, g.index)["hidden_size"]
    if width is None:
        raise SdexportError(f"cannot replace {node.op_type} node {node.name}: its width is not fixed by the graph")
    x = g.one("Add", [node.input[0], node.input[1]])
    left, right = g.split(x, -1, [width // 2, width // 2])
    erf = g.one("Erf", [g.one("Mul", [right, g.floats("inv_sqrt2", 1 / math.sqrt(2))])])
    gelu = g.one("Mul", [g.one("Mul", [right, g.floats("half", 0.5)]), g.one("Add", [erf, g.floats("one", 1.0)])])
    g.one("Mul", [left, gelu], node.output[0])


def _bias_add(g: _Subgraph, node: onnx.NodeProto) -> None:
    """Y = X + bias + skip."""
    g.one("Add", [g.one("Add", [node.input[0], node.input[1]]), node.input[2]], node.output[0])


def _nhwc_conv(g: _Subgraph, node: onnx.NodeProto) -> None:
    """Conv on NCHW, between Transposes; the weight (OHWI for NhwcConv) goes back to OIHW."""
    x = g.one("Transpose", [node.input[0]], perm=[0, 3, 1, 2])
    w = g.one("Transpose", [node.input[1]], perm=[0, 3, 1, 2])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    y = g.one("Conv", [x, w, *node.input[2:3]], **attrs)
    g.one("Transpose", [y], node.output[0], perm=[0, 2, 3, 1])


def _group_norm(g: _Subgraph, node: onnx.NodeProto) -> None:
    """(Skip)GroupNorm as diffusers exports GroupNorm: Reshape to [N, groups, -1], InstanceNormalization,
    Reshape back, scale and shift per channel, then swish when `activation` is 1."""
    facts = node_facts(node, g.index)
    channels, groups = facts["channels"], facts["groups"]
    if not channels or not groups:
        raise SdexportError(
            f"cannot replace {node.op_type} node {node.name}: its channels or groups are not fixed by the graph"
        )
    channels_last = facts["channels_last"] != 0
    x, gamma, beta = node.input[0], node.input[1], node.input[2]
    y = node.output[0]
    if node.op_type == "SkipGroupNorm":
        # skip is [N, H, W, C], [N, 1, 1, C] or [N, C]: as [N, -1, C] it broadcasts against the input
        rows = g.ints("rows", [0, -1, channels])
        total = g.one("Add", [g.one("Reshape", [x, rows]), g.one("Reshape", [node.input[3], rows])])
        if _input(node, 4):
            total = g.one("Add", [total, node.input[4]])
        add_out = node.output[1] if len(node.output) > 1 and node.output[1] else None
        x = g.one("Reshape", [total, g.one("Shape", [x])], add_out)
    nchw = g.one("Transpose", [x], perm=[0, 3, 1, 2]) if channels_last else x
    grouped = g.one("Reshape", [nchw, g.ints("grouped", [0, groups, -1])])
    normed = g.one(
        "InstanceNormalization",
        [grouped, g.floats("ones", np.ones(groups)), g.floats("zeros", np.zeros(groups))],
        epsilon=float(_attr(node, "epsilon", 1e-5)),
    )
    normed = g.one("Reshape", [normed, g.one("Shape", [nchw])])
    if channels_last:
        normed = g.one("Transpose", [normed], perm=[0, 2, 3, 1])
    else:  # per-channel scale and shift on axis 1
        column = g.ints("column", [-1, 1, 1])
        gamma, beta = g.one("Reshape", [gamma, column]), g.one("Reshape", [beta, column])
    swish = facts["activation"] == 1
    affine = g.one("Add", [g.one("Mul", [normed, gamma]), beta], None if swish else y)
    if swish:
        g.one("Mul", [affine, g.one("Sigmoid", [affine])], y)


def _multi_head_attention(g: _Subgraph, node: onnx.NodeProto) -> None:
    """softmax(Q K^T * scale) V per head, from packed QKV, packed KV or separate Q, K, V."""
    extra = [name for i, name in enumerate(node.input) if i > 2 and name]
    outputs = [name for name in node.output[1:] if name]
    if extra or outputs or _attr(node, "unidirectional", 0):
        raise SdexportError(
            f"cannot replace MultiHeadAttention node {node.name}: only inputs query, key and "
            "value and output 0 have a standard-op replacement here"
        )
    facts = node_facts(node, g.index)
    heads, head_size, layout = facts["num_heads"], facts["head_size"], facts["packing"]

    def heads_first(x: str) -> str:  # [B, S, N*H] -> [B, N, S, H]
        split = g.one("Reshape", [x, g.ints(f"heads_{len(g.nodes)}", [0, 0, heads, -1])])
        return g.one("Transpose", [split], perm=[0, 2, 1, 3])

    def unpack(x: str, count: int) -> list[str]:  # [B, S, N, count, H] -> count x [B, N, S, H]
        stacked = g.one("Transpose", [x], perm=[3, 0, 2, 1, 4])
        return [g.squeeze(part, [0]) for part in g.split(stacked, 0, [1] * count)]

    if layout == "QKV":
        q, k, v = unpack(node.input[0], 3)
    elif layout == "KV":
        q, (k, v) = heads_first(node.input[0]), unpack(node.input[1], 2)
    else:
        q, k, v = heads_first(node.input[0]), heads_first(node.input[1]), heads_first(node.input[2])
    scale = _attr(node, "scale", 0.0)
    if scale:
        factor = g.floats("scale", scale)
    elif head_size:
        factor = g.floats("scale", 1 / math.sqrt(head_size))
    else:  # head size known at run time only: 1 / sqrt(H) from Q's shape
        size = g.one("Gather", [g.one("Shape", [q]), g.ints("last", [3])], axis=0)
        factor = g.one("Reciprocal", [g.one("Sqrt", [g.one("Cast", [size], to=TensorProto.FLOAT)])])
    scores = g.one("Mul", [g.one("MatMul", [q, g.one("Transpose", [k], perm=[0, 1, 3, 2])]), factor])
    context = g.one("MatMul", [g.one("Softmax", [scores], axis=-1), v])
    merged = g.one("Transpose", [context], perm=[0, 2, 1, 3])
    g.one("Reshape", [merged, g.ints("merge", [0, 0, -1])], node.output[0])


DECOMPOSE: dict[str, Callable[[_Subgraph, onnx.NodeProto], None]] = {
    "BiasSplitGelu": _bias_split_gelu,
    "BiasAdd": _bias_add,
    "NhwcConv": _nhwc_conv,
    "GroupNorm": _group_norm,
    "SkipGroupNorm": _group_norm,
    "MultiHeadAttention": _multi_head_attention,
}


def decompose(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Replace the named fused nodes by standard ONNX ops, in place (each where it stood, so the graph
    stays sorted); their inputs and outputs keep their names. Returns `model`."""
    wanted = set(names)
    if not wanted:
        return model
    index = GraphIndex(model)
    nodes = []
    found = set()
    for position, node in enumerate(model.graph.node):
        if node.name not in wanted or node.domain != CONTRIB_DOMAIN:
            nodes.append(node)
            continue
        replace = DECOMPOSE.get(node.op_type)
        if replace is None:
            raise SdexportError(
                f"{node.op_type} node {node.name} exceeds its CUDA kernel's limits and has no "
                "standard-op replacement: export with --target generic"
            )
        sub = _Subgraph(node, index, position)
        replace(sub, node)
        nodes.extend(sub.nodes)
        model.graph.initializer.extend(sub.constants)
        found.add(node.name)
    missing = wanted - found
    if missing:
        raise SdexportError(f"no fused node named {', '.join(sorted(missing))} in the graph")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def record_unfused(model: onnx.ModelProto, refusals: list[Refusal]) -> None:
    """Write the refusals to the model's metadata (UNFUSED_KEY), replacing an earlier record."""
    kept = [p for p in model.metadata_props if p.key != UNFUSED_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=UNFUSED_KEY, value=json.dumps([r.as_dict() for r in refusals]))


def unfused_record(model: onnx.ModelProto) -> list[dict] | None:
    """The refusals recorded in a model, or None when it has no record (not a cuda export)."""
    entry = next((p.value for p in model.metadata_props if p.key == UNFUSED_KEY), None)
    return json.loads(entry) if entry is not None else None


def keep_within_limits(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Refusal]]:
    """Replace every fused node its CUDA kernel would refuse by standard ops and record them in the model."""
    refusals = refused_nodes(model)
    decompose(model, [r.node for r in refusals])
    record_unfused(model, refusals)
    return model, refusals
