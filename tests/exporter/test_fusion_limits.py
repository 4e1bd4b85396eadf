"""The cuda target fuses a node only where its CUDA kernel accepts it (sdexport/fusion_limits.py).

CPU only: the fused contrib ops have no CPU kernel, so the checks run on the graphs and the
replacements run on the CPU EP against the plain (unfused) fp32 graph and numpy references.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdexport import fusion_limits as fl
from sdexport.cli import main
from sdexport.errors import SdexportError

MS = "com.microsoft"


# ---------------------------------------------------------------------------------------------
# hand-made graphs


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])


def run_cpu(model, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def fused_node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), name=f"{op}_0", domain=MS, **attrs)


def reason(model):
    refusals = fl.refused_nodes(model)
    assert len(refusals) <= 1
    return refusals[0].reason if refusals else None


def bias_split_gelu_model(widths):
    nodes, inits = [], []
    for k, width in enumerate(widths):
        nodes.append(
            helper.make_node("BiasSplitGelu", [f"x{k}", f"b{k}"], [f"y{k}"], name=f"BiasSplitGelu_{k}", domain=MS)
        )
        inits.append((f"b{k}", np.linspace(-1, 1, width, dtype=np.float32)))
    return make_model(
        nodes, [(f"x{k}", [2, 3, w]) for k, w in enumerate(widths)], [f"y{k}" for k in range(len(widths))], inits
    )


def group_norm_model(channels, groups, op="GroupNorm", gamma_type=np.float32, **attrs):
    attrs = {"groups": groups, "activation": 1, "epsilon": 1e-5, **attrs}
    inputs = ["x", "gamma", "beta"] + (["skip"] if op == "SkipGroupNorm" else [])
    node = fused_node(op, inputs, **attrs)
    shapes = [("x", [1, 2, 2, channels])] + ([("skip", [1, 2, 2, channels])] if op == "SkipGroupNorm" else [])
    return make_model(
        [node], shapes, ["y"], [("gamma", np.ones(channels, gamma_type)), ("beta", np.zeros(channels, gamma_type))]
    )


def packed_attention_model(heads, head_size, layout="QKV", known_shape=True, **attrs):
    """MultiHeadAttention fed as ORT's unet fusion feeds it: packed by a Reshape to [0, 0, N, 3 or 2, H]."""
    count = 3 if layout == "QKV" else 2
    nodes = [helper.make_node("Reshape", ["packed_flat", "packed_shape"], ["packed"], name="reshape")]
    shape = [0, 0, heads, count, head_size] if known_shape else [0, 0, heads, count, -1]
    inputs = [("packed_flat", [2, 5, heads * count * head_size])]
    if layout == "QKV":
        mha_inputs = ["packed"]
    else:
        mha_inputs = ["q", "packed"]
        inputs.append(("q", [2, 4, heads * head_size]))
    nodes.append(fused_node("MultiHeadAttention", mha_inputs, num_heads=heads, **attrs))
    return make_model(nodes, inputs, ["y"], [("packed_shape", np.array(shape, np.int64))])


# ---------------------------------------------------------------------------------------------
# the table, entry by entry


@pytest.mark.parametrize("width", fl.BIAS_SPLIT_GELU_HIDDEN_SIZES)
def test_bias_split_gelu_accepts_its_five_widths(width):
    assert reason(bias_split_gelu_model([width])) is None


@pytest.mark.parametrize("width", [512, 1024, 1280, 2048, 2562])
def test_bias_split_gelu_refuses_other_widths(width):
    assert reason(bias_split_gelu_model([width])) == (
        f"hidden size {width} is not 2560, 5120, 6144, 10240 or 12288 (diffusion/bias_split_gelu.cc)"
    )


def test_a_width_the_graph_does_not_fix_is_refused_conservatively():
    node = fused_node("BiasSplitGelu", ["x", "b"])
    model = make_model([node], [("x", None), ("b", None)], ["y"])
    assert reason(model) == (
        "hidden_size not fixed by the graph, so 'hidden size is 2560, 5120, 6144, 10240 or "
        "12288' cannot be checked: left unfused to be safe (diffusion/bias_split_gelu.cc)"
    )


@pytest.mark.parametrize(
    "op, inputs",
    [
        ("BiasAdd", [("x", [1, 4, 96]), ("skip", [1, 4, 96])]),
        ("NhwcConv", [("x", [1, 4, 4, 7])]),
        ("SkipLayerNormalization", [("x", [1, 4, 96]), ("skip", [1, 4, 96])]),
        ("QuickGelu", [("x", [1, 4, 96])]),
    ],
)
def test_ops_without_width_limits_are_accepted_at_any_width(op, inputs):
    assert fl.LIMITS[op] == ()
    node = fused_node(op, [name for name, _ in inputs])
    assert reason(make_model([node], inputs, ["y"])) is None


@pytest.mark.parametrize(
    "channels, groups",
    [
        (320, 32),
        (640, 32),
        (960, 32),
        (1280, 32),
        (1920, 32),
        (2560, 32),  # SD U-Nets
        (128, 32),
        (256, 32),
        (512, 32),  # SD VAEs
        (64, 32),
        (96, 16),
        (512, 1),
        (1024, 2),  # 2 and 6 channels a group; 512, the most a block takes
    ],
)
def test_group_norm_accepts_even_groups_of_at_most_512(channels, groups):
    assert fl.group_norm_launches(channels, groups)
    assert reason(group_norm_model(channels, groups)) is None
    assert reason(group_norm_model(channels, groups, op="SkipGroupNorm")) is None


@pytest.mark.parametrize("channels, groups", [(32, 32), (8, 8), (96, 32), (514, 1), (1028, 2), (640, 640)])
def test_group_norm_refuses_odd_or_too_large_groups(channels, groups):
    per_group = channels // groups
    assert not fl.group_norm_launches(channels, groups)
    expected = (
        f"{channels} channels in {groups} groups: {per_group} per group (the kernel needs an even number, "
        "at most 512) (diffusion/group_norm_impl.cu)"
    )
    assert reason(group_norm_model(channels, groups)) == expected
    assert reason(group_norm_model(channels, groups, op="SkipGroupNorm")) == expected


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"channels_last": 0}, "channels_last is 0 (the CUDA kernel is channels-last only) (diffusion/group_norm.cc)"),
        ({"activation": 2}, "activation 2 is not 0 or 1 (diffusion/group_norm.cc)"),
        ({"groups": 3}, "64 channels do not divide into 3 groups (diffusion/group_norm.cc)"),
        ({"gamma_type": np.float16}, "gamma or beta is not float32 (diffusion/group_norm.cc)"),
    ],
)
def test_group_norm_attribute_limits(change, expected):
    options = {"groups": 32, **change}
    assert reason(group_norm_model(64, **options)) == expected


def test_group_norm_channels_per_block_follows_the_kernel():
    """GetChannelsPerBlock of group_norm_common_base.cc on worked cases."""
    assert fl.group_norm_channels_per_block(320, 32) == 320  # 10 per group, one block of 320
    assert fl.group_norm_channels_per_block(640, 32) == 320
    assert fl.group_norm_channels_per_block(1280, 32) == 320
    assert fl.group_norm_channels_per_block(512, 32) == 512
    assert fl.group_norm_channels_per_block(96, 32) == 126  # 3 per group: 128 // 3 * 3 wastes the fewest threads
    assert fl.group_norm_channels_per_block(600, 1) == 600  # 256 or more a group: one group a block


@pytest.mark.parametrize("layout", ["QKV", "KV"])
@pytest.mark.parametrize(
    "heads, head_size, threads",
    [
        (8, 40, 80),
        (8, 80, 160),
        (8, 160, 320),  # SD 1.5
        (20, 64, 320),  # SD XL
        (16, 256, 1024),  # 4-wide vectors: 16 x 64 threads, the most a block has
        (512, 2, 512),
        (204, 5, 1020),
    ],
)
def test_packed_attention_accepted_while_it_unpacks_in_one_block(layout, heads, head_size, threads):
    model = packed_attention_model(heads, head_size, layout)
    assert fl.node_facts(model.graph.node[1], fl.GraphIndex(model))["unpack_threads"] == threads
    assert reason(model) is None


@pytest.mark.parametrize("layout", ["QKV", "KV"])
@pytest.mark.parametrize(
    "heads, head_size, threads", [(20, 256, 1280), (342, 6, 1026), (8, 129, 1032), (1025, 4, 1025)]
)
def test_packed_attention_refused_when_unpacking_needs_more_threads(layout, heads, head_size, threads):
    expected = (
        f"packed {layout} of {heads} heads of size {head_size} needs {threads} threads per block to unpack "
        "(at most 1024) (bert/add_bias_transpose.cu)"
    )
    if heads > 1024:
        expected = f"{heads} heads (at most 1024) (../cpu/bert/multihead_attention_helper.h)"
    assert reason(packed_attention_model(heads, head_size, layout)) == expected


def test_separate_qkv_attention_has_no_width_limit():
    node = fused_node("MultiHeadAttention", ["q", "k", "v"], num_heads=20)
    model = make_model([node], [("q", [2, 4, 20 * 256]), ("k", [2, 6, 20 * 256]), ("v", [2, 6, 20 * 256])], ["y"])
    assert reason(model) is None
    many = make_model(
        [fused_node("MultiHeadAttention", ["q", "k", "v"], num_heads=2048)],
        [("q", None), ("k", None), ("v", None)],
        ["y"],
    )
    assert reason(many) == "2048 heads (at most 1024) (../cpu/bert/multihead_attention_helper.h)"


def test_packed_attention_with_an_unknown_head_size_is_refused_conservatively():
    assert reason(packed_attention_model(8, 40, known_shape=False)).startswith(
        "unpack_threads not fixed by the graph, so 'packed QKV/KV unpack with at most 1024 threads"
    )


def test_clip_attention_limit():
    def attention(heads):
        return make_model(
            [fused_node("Attention", ["x", "w"], num_heads=heads)], [("x", [1, 77, 64]), ("w", [64, 192])], ["y"]
        )

    assert reason(attention(8)) is None
    assert reason(attention(2048)) == "2048 heads (at most 1024) (../cpu/bert/attention_base.cc)"


# ---------------------------------------------------------------------------------------------
# the replacements, against numpy


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_only_the_refused_bias_split_gelu_is_replaced_and_computes_the_same():
    model = bias_split_gelu_model([2560, 1024])
    model, refusals = fl.keep_within_limits(model)
    assert [(r.node, r.op) for r in refusals] == [("BiasSplitGelu_1", "BiasSplitGelu")]
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count((MS, "BiasSplitGelu")) == 1 and model.graph.node[0].name == "BiasSplitGelu_0"
    assert fl.refused_nodes(model) == []
    assert fl.unfused_record(model) == [refusals[0].as_dict()]
    # the replacement runs on the CPU EP once the accepted node, which has no CPU kernel, is cut away
    rest = make_model(
        [n for n in model.graph.node if n.domain != MS],
        [("x1", [2, 3, 1024])],
        ["y1"],
        [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer if t.name != "b0"],
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 1024), dtype=np.float32)
    a = x + np.linspace(-1, 1, 1024, dtype=np.float32)
    expected = a[..., :512] * gelu(a[..., 512:])
    np.testing.assert_allclose(run_cpu(rest, {"x1": x})[0], expected, atol=1e-5)


def group_norm_reference(x, gamma, beta, groups, epsilon, swish):
    n, h, w, c = x.shape
    grouped = x.reshape(n, h * w, groups, c // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = grouped.var(axis=(1, 3), keepdims=True)
    y = ((grouped - mean) / np.sqrt(var + epsilon)).reshape(x.shape) * gamma + beta
    return y / (1 + np.exp(-y)) if swish else y


@pytest.mark.parametrize("skip_shape", [None, (2, 3, 5, 12), (2, 1, 1, 12), (2, 12)])
@pytest.mark.parametrize("swish, with_bias", [(0, False), (1, True)])
def test_group_norm_replacement(skip_shape, swish, with_bias):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 12), dtype=np.float32) * 3 + 1
    gamma, beta = rng.standard_normal(12, dtype=np.float32), rng.standard_normal(12, dtype=np.float32)
    feeds, inits = {"x": x}, [("gamma", gamma), ("beta", beta)]
    inputs, outputs = ["x", "gamma", "beta"], ["y"]
    total = x
    if skip_shape:
        feeds["skip"] = rng.standard_normal(skip_shape, dtype=np.float32)
        inputs.append("skip")
        total = x + feeds["skip"].reshape(2, 1, 1, 12) if len(skip_shape) == 2 else x + feeds["skip"]
        if with_bias:
            inits.append(("bias", rng.standard_normal(12, dtype=np.float32)))
            inputs.append("bias")
            total = total + inits[-1][1]
        outputs.append("sum")
    op = "SkipGroupNorm" if skip_shape else "GroupNorm"
    node = fused_node(op, inputs, outputs, groups=4, activation=swish, epsilon=1e-5)
    model = make_model([node], [(k, list(v.shape)) for k, v in feeds.items()], outputs, inits)
    fl.decompose(model, [node.name])
    got = run_cpu(model, feeds)
    np.testing.assert_allclose(got[0], group_norm_reference(total, gamma, beta, 4, 1e-5, swish), atol=1e-4)
    if skip_shape:
        np.testing.assert_allclose(got[1], total, atol=1e-6)


def test_channels_first_group_norm_replacement():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 12, 3, 5), dtype=np.float32)
    gamma, beta = rng.standard_normal(12, dtype=np.float32), rng.standard_normal(12, dtype=np.float32)
    node = fused_node("GroupNorm", ["x", "gamma", "beta"], groups=6, activation=1, epsilon=1e-6, channels_last=0)
    model = make_model([node], [("x", list(x.shape))], ["y"], [("gamma", gamma), ("beta", beta)])
    assert "channels_last is 0" in reason(model)
    model, _ = fl.keep_within_limits(model)
    expected = group_norm_reference(x.transpose(0, 2, 3, 1), gamma, beta, 6, 1e-6, True).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(run_cpu(model, {"x": x})[0], expected, atol=1e-4)


def test_nhwc_conv_and_bias_add_replacements():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 7, 5), dtype=np.float32)  # NHWC
    weight = rng.standard_normal((8, 5, 3, 3), dtype=np.float32)  # OIHW
    bias, skip = rng.standard_normal(8, dtype=np.float32), rng.standard_normal((1, 3, 4, 8), dtype=np.float32)
    conv_attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nhwc = helper.make_node("NhwcConv", ["x", "w_ohwi", "b"], ["conv"], name="NhwcConv_0", domain=MS, **conv_attrs)
    flat = helper.make_node("Reshape", ["conv", "rows"], ["conv3"], name="rows")
    add = helper.make_node("BiasAdd", ["conv3", "b", "skip3"], ["y"], name="BiasAdd_0", domain=MS)
    skip_flat = helper.make_node("Reshape", ["skip", "rows"], ["skip3"], name="skip_rows")
    model = make_model(
        [nhwc, flat, skip_flat, add],
        [("x", list(x.shape)), ("skip", list(skip.shape))],
        ["y"],
        [("w_ohwi", weight.transpose(0, 2, 3, 1)), ("b", bias), ("rows", np.array([1, -1, 8]))],
    )
    fl.decompose(model, ["NhwcConv_0", "BiasAdd_0"])
    plain = make_model(
        [helper.make_node("Conv", ["x_nchw", "w", "b"], ["y"], **conv_attrs)],
        [("x_nchw", [1, 5, 6, 7])],
        ["y"],
        [("w", weight), ("b", bias)],
    )
    conv = run_cpu(plain, {"x_nchw": x.transpose(0, 3, 1, 2)})[0].transpose(0, 2, 3, 1)
    expected = conv.reshape(1, -1, 8) + bias + skip.reshape(1, -1, 8)
    np.testing.assert_allclose(run_cpu(model, {"x": x, "skip": skip})[0], expected, atol=1e-4)


def attention_reference(q, k, v, scale):
    """q [B, N, S, H], k and v [B, N, L, H] -> [B, S, N * H]."""
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("layout", ["QKV", "KV", "Q_K_V"])
@pytest.mark.parametrize("known_shape, scale", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_attention_replacement(layout, known_shape, scale):
    heads, size = 3, 6
    rng = np.random.default_rng(4)
    attrs = {"scale": scale} if scale else {}
    if layout == "Q_K_V":
        q, k, v = (rng.standard_normal((2, s, heads * size), dtype=np.float32) for s in (4, 5, 5))
        shape = (lambda s: [2, s, heads * size]) if known_shape else (lambda s: None)
        model = make_model(
            [fused_node("MultiHeadAttention", ["q", "k", "v"], num_heads=heads, **attrs)],
            [("q", shape(4)), ("k", shape(5)), ("v", shape(5))],
            ["y"],
        )
        feeds = {"q": q, "k": k, "v": v}
        split = [t.reshape(2, -1, heads, size).transpose(0, 2, 1, 3) for t in (q, k, v)]
    else:
        model = packed_attention_model(heads, size, layout, known_shape, **attrs)
        count = 3 if layout == "QKV" else 2
        packed = rng.standard_normal((2, 5, heads * count * size), dtype=np.float32)
        parts = [packed.reshape(2, 5, heads, count, size)[:, :, :, i].transpose(0, 2, 1, 3) for i in range(count)]
        feeds = {"packed_flat": packed}
        if layout == "KV":
            feeds["q"] = rng.standard_normal((2, 4, heads * size), dtype=np.float32)
            parts = [feeds["q"].reshape(2, 4, heads, size).transpose(0, 2, 1, 3), *parts]
        split = parts
    fl.decompose(model, ["MultiHeadAttention_0"])
    expected = attention_reference(*split, scale or 1 / math.sqrt(size))
    np.testing.assert_allclose(run_cpu(model, feeds)[0], expected, atol=1e-5)


def test_replacement_refusals_are_one_line():
    masked = make_model(
        [fused_node("MultiHeadAttention", ["q", "k", "v", "", "mask"], num_heads=2)],
        [("q", [1, 2, 4]), ("k", [1, 2, 4]), ("v", [1, 2, 4]), ("mask", [1, 2])],
        ["y"],
    )
    with pytest.raises(SdexportError, match="^cannot replace MultiHeadAttention node MultiHeadAttention_0: only"):
        fl.decompose(masked, ["MultiHeadAttention_0"])
    with pytest.raises(SdexportError, match="^no fused node named nowhere in the graph$"):
        fl.decompose(masked, ["nowhere"])
    attention = make_model(
        [fused_node("Attention", ["x", "w"], num_heads=2048)], [("x", [1, 2, 4]), ("w", [4, 12])], ["y"]
    )
    with pytest.raises(SdexportError, match="^Attention node Attention_0 exceeds its CUDA kernel's limits and has no"):
        fl.keep_within_limits(attention)


def test_no_record_without_the_cuda_target():
    assert fl.unfused_record(make_model([], [("x", [1])], ["x"])) is None


# ---------------------------------------------------------------------------------------------
# the shapes preset: widths that BiasSplitGelu (1024) and the U-Net's GroupNorm (32 channels in 32 groups) refuse


@pytest.fixture(scope="module")
def shapes_graphs(tmp_path_factory):
    """{component: (plain fp32 graph, graph after the cuda fusions)} of the shapes U-Net and VAE decoder."""
    from sdexport.load import load_source
    from sdexport.optimize import cuda_fusions
    from sdexport.specs import set_attention
    from sdexport.trace import trace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_source("shapes").pipe
        set_attention(pipe, "plain")  # the cuda target's export: ORT fuses plain attention only
        graphs = {}
        for component in ("unet", "vae_decoder"):
            path = trace(component, pipe, 17, {}, (8, 8), 2, tmp_path_factory.mktemp(component) / "model.onnx")
            plain = onnx.load(str(path), load_external_data=True)
            graphs[component] = (plain, cuda_fusions(component, copy.deepcopy(plain), fp16=True))
    return pipe, graphs


def contrib_ops(model):
    return [n.op_type for n in model.graph.node if n.domain == MS]


def test_cuda_fusions_leave_no_node_their_kernel_refuses(shapes_graphs):
    _, graphs = shapes_graphs
    unet, vae = graphs["unet"][1], graphs["vae_decoder"][1]
    for model in (unet, vae):
        assert fl.refused_nodes(model) == []
        assert set(contrib_ops(model)) <= set(fl.LIMITS)  # every op the fusions emit has its entry
    # refused: BiasSplitGelu at 1024 and the U-Net's GroupNorms with an odd number of channels a group:
    # 32 in 32 groups (its 32-wide level) and 96 in 32 (64 + 32 channels where up blocks take skips);
    # its other GroupNorms and all of the VAE's (2 and 4 a group) stay fused
    assert "BiasSplitGelu" not in contrib_ops(unet)
    assert {"GroupNorm", "SkipGroupNorm", "NhwcConv", "MultiHeadAttention", "BiasAdd"} <= set(contrib_ops(unet))
    unfused = fl.unfused_record(unet)
    assert {r["op"] for r in unfused} == {"BiasSplitGelu", "GroupNorm", "SkipGroupNorm"}
    assert [r["op"] for r in unfused].count("BiasSplitGelu") == 4
    assert all("hidden size 1024" in r["reason"] for r in unfused if r["op"] == "BiasSplitGelu")
    assert {r["reason"].split(" (")[0] for r in unfused if "GroupNorm" in r["op"]} == {
        "32 channels in 32 groups: 1 per group",
        "96 channels in 32 groups: 3 per group",
    }
    for model in (unet, vae):
        index = fl.GraphIndex(model)
        kept = [n for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
        assert kept and all(fl.node_facts(n, index)["per_group"] >= 2 for n in kept)
    assert fl.unfused_record(vae) == []


def without_fused_ops(model):
    """Every remaining fused node replaced too, so the graph runs on the CPU EP."""
    model = copy.deepcopy(model)
    return fl.decompose(model, [n.name for n in model.graph.node if n.domain == MS and n.op_type in fl.DECOMPOSE])


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_fused_then_replaced_graph_computes_the_plain_graph(shapes_graphs, component):
    from sdexport.precision import fp32_nodes, to_fp16
    from sdexport.specs import example_inputs

    pipe, graphs = shapes_graphs
    plain, fused = graphs[component]
    feeds = {k: v.numpy() for k, v in example_inputs(component, pipe, 2, 8, 8).items()}
    expected = run_cpu(plain, feeds)[0]
    replaced = without_fused_ops(fused)
    assert set(contrib_ops(replaced)) <= {"SkipLayerNormalization"}  # it has a CPU kernel
    assert np.max(np.abs(run_cpu(replaced, feeds)[0] - expected)) <= 1e-4
    # and in fp16, converted as the cuda target converts it (the replacements type-check and run)
    half = to_fp16(component, replaced, fp32_nodes(component, replaced, False))
    half_feeds = {k: v.astype(np.float16) if k != "timestep" else v for k, v in feeds.items()}
    got = run_cpu(half, half_feeds)[0].astype(np.float32)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-2


@pytest.fixture(scope="module")
def shapes_cuda16(tmp_path_factory):
    from sdexport import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(
            "shapes",
            tmp_path_factory.mktemp("fusion-limits") / "export",
            components=["unet", "vae_decoder"],
            target="cuda",
            dtype="fp16",
            log=lambda line: None,
        )


def test_inspect_lists_what_was_left_unfused(shapes_cuda16, capsys):
    for component in ("unet", "vae_decoder"):
        assert fl.refused_nodes(onnx.load(str(shapes_cuda16 / component / "model.onnx"))) == []
    assert main(["inspect", str(shapes_cuda16)]) == 0
    text = capsys.readouterr().out
    assert "left unfused for CUDA kernel limits: none" in text  # the VAE decoder
    assert (
        "BiasSplitGelu BiasSplitGelu_0: hidden size 1024 is not 2560, 5120, 6144, 10240 or 12288 "
        "(diffusion/bias_split_gelu.cc)"
    ) in text
    assert "32 channels in 32 groups: 1 per group" in text
    assert main(["inspect", "--json", str(shapes_cuda16)]) == 0
    report = json.loads(capsys.readouterr().out)
    unet, vae = report["components"]["unet"], report["components"]["vae_decoder"]
    assert f"left unfused for CUDA kernel limits: {len(unet['unfused'])}" in text
    assert [u["op"] for u in unet["unfused"]].count("BiasSplitGelu") == 4
    assert {u["op"] for u in unet["unfused"]} == {"BiasSplitGelu", "GroupNorm", "SkipGroupNorm"}
    assert set(unet["unfused"][0]) == {"node", "op", "reason"}
    assert vae["unfused"] == []
    assert "com.microsoft.BiasSplitGelu" not in " ".join(unet["contrib_ops"])
