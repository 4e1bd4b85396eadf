"""weight_placement: the recipe of the manifest's weight map, checked against the layouts as ONNX Runtime writes
them (MLAS's NCHWc filter reorders, the CUDA fusions' NhwcConv and packed Q/K/V and K/V weights), rewritten
here from their sources as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from sdruntime.errors import InvalidArgument
from sdruntime.weight_placement import add_to_initializer, placement, read_placed, set_placed, transformed

RNG = np.random.default_rng(0)


def mlas_oihwbibo(w: np.ndarray, block: int) -> np.ndarray:
    """MLAS ReorderFilterOIHWBiBo, loop for loop: blocks of output and input channels, each kernel position a
    [block_in, block_out] tile, zero padded; ORT stores it as [padded O, I, kh, kw]."""
    o_count, i_count, kh, kw = w.shape
    src = w.reshape(o_count, i_count, kh * kw)
    out = []
    for o0 in range(0, o_count, block):
        for i0 in range(0, i_count, block):
            for k in range(kh * kw):
                for bi in range(block):
                    for bo in range(block):
                        o, i = o0 + bo, i0 + bi
                        out.append(src[o, i, k] if o < o_count and i < i_count else 0.0)
    padded = -(-o_count // block) * block
    return np.array(out, np.float32).reshape(padded, -(-i_count // block) * block, kh, kw)


def mlas_oihwbo(w: np.ndarray, block: int) -> np.ndarray:
    """MLAS ReorderFilterOIHWBo (convolutions over fewer input channels than a block): [O/B][I][kh][kw][B]."""
    o_count, i_count, kh, kw = w.shape
    out = []
    for o0 in range(0, o_count, block):
        for i in range(i_count):
            for k in range(kh * kw):
                for bo in range(block):
                    out.append(w[o0 + bo, i].reshape(-1)[k] if o0 + bo < o_count else 0.0)
    return np.array(out, np.float32).reshape(-(-o_count // block) * block, i_count, kh, kw)


def nchwc_entry(shape, block: int, per_input_block: bool) -> dict:
    o_count, i_count, kh, kw = shape
    padded = -(-o_count // block) * block
    if per_input_block:
        steps = [["pad", [[0, padded - o_count], [0, 0], [0, 0], [0, 0]]]]
        steps += [["reshape", [padded // block, block, i_count // block, block, kh, kw]]]
        steps += [["transpose", [0, 2, 4, 5, 3, 1]]]
        return {"initializer": "w", "steps": steps, "view": [padded // block, i_count // block, kh, kw, block, block]}
    steps = [["pad", [[0, padded - o_count], [0, 0], [0, 0], [0, 0]]]]
    steps += [["reshape", [padded // block, block, i_count, kh, kw]], ["transpose", [0, 2, 3, 4, 1]]]
    return {"initializer": "w", "steps": steps, "view": [padded // block, i_count, kh, kw, block]}


def ort_packed_qkv(q, k, v, heads: int) -> np.ndarray:
    """fusion_attention_unet.py's packed QKV: MatMul weights [in, out] interleaved per head."""
    c, h = q.shape[0], q.shape[1] // heads
    return np.dstack([q.reshape(c, heads, h), k.reshape(c, heads, h), v.reshape(c, heads, h)]).reshape(c, -1)


def ort_stacked_qkv(q, k, v) -> np.ndarray:
    """fusion_attention_unet.py's Attention weight (unpacked QKV): np.stack on axis 1."""
    return np.stack((q, k, v), axis=1).reshape(q.shape[0], -1)


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("shape", [(24, 16, 3, 3), (32, 32, 1, 1), (4, 32, 3, 3)])
def test_nchwc_blocked_filter_recipe_matches_mlas(block, shape):
    w = RNG.standard_normal(shape).astype(np.float32)
    graph = mlas_oihwbibo(w, block)
    np.testing.assert_array_equal(
        read_placed(graph, nchwc_entry(shape, block, True)), transformed(w, nchwc_entry(shape, block, True))
    )
    assert graph.shape[0] % block == 0


@pytest.mark.parametrize("block", [8, 16])
def test_nchw_input_filter_recipe_matches_mlas(block):
    w = RNG.standard_normal((20, 4, 3, 3)).astype(np.float32)
    graph, entry = mlas_oihwbo(w, block), nchwc_entry(w.shape, block, False)
    np.testing.assert_array_equal(read_placed(graph, entry), transformed(w, entry))


def test_packed_qkv_kv_and_stacked_recipes_match_ort():
    c, o, heads = 12, 16, 4
    q, k, v = (RNG.standard_normal((o, c)).astype(np.float32) for _ in range(3))  # PyTorch Linear weights [out, in]
    packed = ort_packed_qkv(q.T, k.T, v.T, heads)
    kv = np.dstack([k.T.reshape(c, heads, -1), v.T.reshape(c, heads, -1)]).reshape(c, -1)
    stacked = ort_stacked_qkv(q.T, k.T, v.T)
    split = [["transpose", [1, 0]], ["reshape", [c, heads, o // heads]]]
    for role, weight in enumerate((q, k, v)):
        entry = {
            "initializer": "qkv",
            "steps": split,
            "view": [c, heads, 3, o // heads],
            "at": [None, None, role, None],
        }
        np.testing.assert_array_equal(read_placed(packed, entry), transformed(weight, entry))
        entry = {"initializer": "qkv", "steps": [["transpose", [1, 0]]], "view": [c, 3, o], "at": [None, role, None]}
        np.testing.assert_array_equal(read_placed(stacked, entry), transformed(weight, entry))
    for role, weight in enumerate((k, v)):
        entry = {"initializer": "kv", "steps": split, "view": [c, heads, 2, o // heads], "at": [None, None, role, None]}
        np.testing.assert_array_equal(read_placed(kv, entry), transformed(weight, entry))


def test_adding_a_delta_equals_packing_the_changed_weights():
    """A LoRA delta added through the recipe equals ORT's packing of the changed weights; the others stay."""
    c, o, heads = 8, 12, 3
    q, k, v = (RNG.standard_normal((o, c)).astype(np.float32) for _ in range(3))
    delta = RNG.standard_normal((o, c)).astype(np.float32)
    entry = {
        "initializer": "qkv",
        "steps": [["transpose", [1, 0]], ["reshape", [c, heads, o // heads]]],
        "view": [c, heads, 3, o // heads],
        "at": [None, None, 1, None],
    }
    graph = ort_packed_qkv(q.T, k.T, v.T, heads)
    changed = add_to_initializer(graph, entry, delta)
    np.testing.assert_allclose(changed, ort_packed_qkv(q.T, (k + delta).T, v.T, heads), rtol=0, atol=1e-6)
    assert changed.dtype == np.float32 and not np.shares_memory(changed, graph)
    half = add_to_initializer(graph.astype(np.float16), entry, delta)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, ort_packed_qkv(q.T, (k + delta).T, v.T, heads), rtol=2e-3, atol=1e-3)


def test_a_padded_filter_keeps_its_zero_padding():
    w, delta = (RNG.standard_normal((12, 16, 3, 3)).astype(np.float32) for _ in range(2))
    entry = nchwc_entry(w.shape, 8, True)
    changed = add_to_initializer(mlas_oihwbibo(w, 8), entry, delta)
    np.testing.assert_allclose(changed, mlas_oihwbibo(w + delta, 8), atol=1e-6)
    np.testing.assert_array_equal(set_placed(changed, entry, w), mlas_oihwbibo(w, 8))


def test_nhwc_conv_and_plain_layouts():
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    nhwc = {"initializer": "w", "steps": [["transpose", [0, 2, 3, 1]]]}
    np.testing.assert_array_equal(read_placed(w.transpose(0, 2, 3, 1).copy(), nhwc), transformed(w, nhwc))
    table = RNG.standard_normal((10, 6)).astype(np.float16)
    assert placement({"initializer": "t"}, table.shape) == ((10, 6), (slice(None), slice(None)))
    row = {"initializer": "t", "view": [10, 6], "at": [[2, 4], None]}
    np.testing.assert_array_equal(read_placed(table, row), table[2:4].astype(np.float32))


def test_a_planted_wrong_layout_and_a_missing_weight_are_caught():
    w = RNG.standard_normal((16, 16, 1, 1)).astype(np.float32)
    graph = mlas_oihwbibo(w, 8)
    assert not np.array_equal(
        read_placed(graph, nchwc_entry(w.shape, 16, True)), transformed(w, nchwc_entry(w.shape, 16, True))
    )
    with pytest.raises(InvalidArgument, match="does not fit initializer"):
        add_to_initializer(graph, nchwc_entry(w.shape, 8, True), np.zeros((16, 8, 1, 1), np.float32))
    with pytest.raises(InvalidArgument, match="folded away"):
        add_to_initializer(graph, {"initializer": None, "why": "folded away"}, w)
