"""The manifest's weight map (sdexport/weight_map.py): every Linear and Conv weight and the token-embedding
table of the U-Net and the text encoders is placed in the written graph, on every target and dtype. The oracle
is PyTorch's own weight: each recipe, applied by the runtime's weight_placement, must reproduce the graph's
block from it (exactly in fp32, within float16 rounding in fp16)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16
from sdruntime.manifest import read_manifest
from sdruntime.onnx_proto import read_initializers
from sdruntime.weight_placement import read_placed, transformed

from sdexport import convert
from sdexport.weight_map import NOT_FOUND, map_weights, sample_of
from tests.runtime.test_weight_placement import mlas_oihwbibo, mlas_oihwbo, ort_packed_qkv


def quiet_convert(preset: str, out: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(preset, out, log=lambda line: None, check=False, **kw)


@pytest.fixture(scope="module")
def tiny_cuda_static32(tmp_path_factory) -> Path:
    """The cuda target in fp32 (unpacked Attention weights, NhwcConv), static shapes."""
    out = tmp_path_factory.mktemp("weight-map") / "cuda32"
    return quiet_convert("tiny-sd", out, target="cuda", static=True, components=["text_encoder", "unet"])


@pytest.fixture(scope="module")
def sdxl_cuda16(tmp_path_factory) -> Path:
    """The cuda target in fp16 (packed Q/K/V and K/V per head), static shapes."""
    out = tmp_path_factory.mktemp("weight-map") / "sdxl_cuda16"
    parts = ["text_encoder", "text_encoder_2", "unet"]
    return quiet_convert("sdxl-tiny", out, target="cuda", dtype="fp16", static=True, components=parts)


@pytest.fixture(scope="module")
def sdxl_cpu32(tmp_path_factory) -> Path:
    return quiet_convert("sdxl-tiny", tmp_path_factory.mktemp("weight-map") / "sdxl_cpu32", target="cpu")


@pytest.fixture(scope="module")
def sdxl_cuda32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weight-map") / "sdxl_cuda32"
    return quiet_convert("sdxl-tiny", out, target="cuda", components=["text_encoder", "text_encoder_2", "unet"])


def listed_weights(module: torch.nn.Module) -> set[str]:
    """What the map must list: every Linear and Conv weight, and the token-embedding table."""
    names = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    if hasattr(module, "text_model"):
        names.add("text_model.embeddings.token_embedding.weight")
    return names


def reproduces(place: dict, weight: np.ndarray, initializer: np.ndarray) -> bool:
    """The recipe applied to the PyTorch weight gives the initializer's block exactly: for float16 graphs, the
    weight as the fp16 pass (onnxconverter-common's, in ORT) converts it: magnitudes below float16's smallest
    subnormal clamped up to it, then rounded to nearest."""
    block, expected = read_placed(initializer, place), transformed(weight, place)
    if block.shape != expected.shape:
        return False
    if initializer.dtype == np.float16:
        tiny = np.float32(5.96e-08)  # convert_float_to_float16's min_positive_val
        expected = np.where((np.abs(expected) > 0) & (np.abs(expected) < tiny), np.sign(expected) * tiny, expected)
        expected = expected.astype(np.float16).astype(np.float32)
    return np.array_equal(block, expected)


def layout_kind(place: dict) -> str:
    ops = [op for op, _ in place.get("steps", ())]
    if "at" in place:
        return "packed per head" if "reshape" in ops else "packed"
    if "reshape" in ops:
        return "nchwc"
    return {(): "plain", ("transpose",): "transposed"}.get(tuple(ops), "other")


def checked_map(pipe, folder: Path, component: str) -> dict[str, int]:
    """Every weight listed, placed and reproduced; returns how many weights each layout kind holds."""
    weights = read_manifest(folder).components[component].weights
    module = getattr(pipe, component)
    assert set(weights) == listed_weights(module)
    assert {name: p["why"] for name, p in weights.items() if p["initializer"] is None} == {}
    state = module.state_dict()
    arrays = read_initializers(folder / component / "model.onnx", {p["initializer"] for p in weights.values()})
    wrong = [n for n, p in weights.items() if not reproduces(p, state[n].numpy(), arrays[p["initializer"]])]
    assert wrong == []
    kinds: dict[str, int] = {}
    for place in weights.values():
        kinds[layout_kind(place)] = kinds.get(layout_kind(place), 0) + 1
    return kinds


# (pipeline, export, the layout kinds its U-Net must show besides plain and transposed ones)
CASES = [
    ("tiny_pipe", "tiny32", set()),
    ("tiny_pipe", "tiny16", set()),
    ("tiny_pipe", "tiny_cpu32", {"nchwc"}),
    pytest.param("tiny_pipe", "tiny_cuda_static32", {"packed"}, marks=pytest.mark.slow),
    ("tiny_pipe", "tiny_cuda16", {"packed per head"}),
    ("sdxl_pipe", "sdxl32", set()),
    ("sdxl_pipe", "sdxl16", set()),
    ("sdxl_pipe", "sdxl_cuda16", {"packed per head"}),
    pytest.param("sdxl_pipe", "sdxl_cpu32", {"nchwc"}, marks=pytest.mark.slow),
    pytest.param("sdxl_pipe", "sdxl_cuda32", {"packed"}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("pipe_name", "export_name", "special"), CASES)
def test_every_weight_is_placed_and_reproduced(request, pipe_name, export_name, special):
    pipe, folder = request.getfixturevalue(pipe_name), request.getfixturevalue(export_name)
    manifest = read_manifest(folder)
    mapped = {c for c, entry in manifest.components.items() if entry.weights is not None}
    assert mapped == {c for c in ("unet", "text_encoder", "text_encoder_2") if c in manifest.components}
    kinds = checked_map(pipe, folder, "unet")
    assert set(kinds) - {"plain", "transposed"} == special
    for component in mapped - {"unet"}:
        assert set(checked_map(pipe, folder, component)) <= {"plain", "transposed"}


def test_a_planted_wrong_layout_is_caught(tiny_pipe, tiny_cpu32, tiny_cuda16):
    """The check above fails for a recipe with the wrong block size, axis order or head: it tells layouts apart."""
    state = tiny_pipe.unet.state_dict()
    blocked = read_manifest(tiny_cpu32).components["unet"].weights["down_blocks.1.resnets.0.conv2.weight"]
    packed = (
        read_manifest(tiny_cuda16)
        .components["unet"]
        .weights["mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"]
    )
    for folder, place, name in (
        (tiny_cpu32, blocked, "down_blocks.1.resnets.0.conv2.weight"),
        (tiny_cuda16, packed, "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"),
    ):
        initializer = read_initializers(folder / "unet" / "model.onnx", [place["initializer"]])[place["initializer"]]
        assert reproduces(place, state[name].numpy(), initializer)
        for planted in plants(place):
            assert not reproduces(planted, state[name].numpy(), initializer), planted


def plants(place: dict) -> list[dict]:
    """Wrong versions of a recipe: its last transpose's inner axes swapped, and for a packed one the next role."""
    steps = [list(step) for step in place["steps"]]
    last = max(i for i, (op, _) in enumerate(steps) if op == "transpose")
    axes = list(steps[last][1])
    axes[-1], axes[-2] = axes[-2], axes[-1]
    swapped = {**place, "steps": steps[:last] + [["transpose", axes]] + steps[last + 1 :]}
    if "at" not in place:
        return [swapped]
    at = [a if a is None else (a + 1) % 3 for a in place["at"]]
    return [swapped, {**place, "at": at}]


# -- map_weights on hand-made graphs: each layout as ORT writes it, and what cannot be told ----------------

RNG = np.random.default_rng(3)


def weights_and_graph() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PyTorch-layout weights and the initializers a graph holds them in."""
    w = {
        "proj.weight": RNG.standard_normal((6, 5)),
        "lin.weight": RNG.standard_normal((7, 5)),
        "nhwc.weight": RNG.standard_normal((8, 6, 3, 3)),
        "blocked.weight": RNG.standard_normal((24, 32, 3, 3)),
        "first.weight": RNG.standard_normal((12, 4, 3, 3)),
        "attn.to_q.weight": RNG.standard_normal((16, 12)),
        "attn.to_k.weight": RNG.standard_normal((16, 12)),
        "attn.to_v.weight": RNG.standard_normal((16, 12)),
        "lost.weight": RNG.standard_normal((9, 5)),
        "twice.weight": RNG.standard_normal((3, 10)),
        "zero.weight": np.zeros((4, 4)),
        "tiny.weight": RNG.standard_normal((5, 5)) * 1e-9,  # below float16's subnormals: clamped by the fp16 pass
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    q, k, v = (w[f"attn.to_{x}.weight"].T for x in "qkv")
    graph = {
        "m.proj.weight": w["proj.weight"],
        "onnx::MatMul_1": w["lin.weight"].T,
        "NhwcConv_0_weight_NHWC": w["nhwc.weight"].transpose(0, 2, 3, 1),
        "reorder_token_1": mlas_oihwbibo(w["blocked.weight"], 16),
        "reorder": mlas_oihwbo(w["first.weight"], 8),
        "MatMul_QKV_0_weight": ort_packed_qkv(q, k, v, heads=4),
        "scrambled": RNG.permutation(w["lost.weight"].reshape(-1)).reshape(9, 5),
        "dup_a": w["twice.weight"],
        "dup_b": w["twice.weight"].copy(),
        "zeros": np.zeros((4, 4), np.float32),
        "m.tiny.weight": w["tiny.weight"],
    }
    return w, {k: np.ascontiguousarray(v, np.float32) for k, v in graph.items()}


def saved_graph(graph: dict[str, np.ndarray], path: Path, fp16: bool) -> Path:
    """The initializers in a graph that uses each (an Identity apiece), converted to fp16 as exports are."""
    initializers = [numpy_helper.from_array(a, n) for n, a in graph.items()]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in graph]
    outputs = [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, list(a.shape)) for n, a in graph.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [], outputs, initializers), opset_imports=[helper.make_opsetid("", 17)]
    )
    if fp16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns about the values it clamps
            model = convert_float_to_float16(model, keep_io_types=False)
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("fp16", [False, True])
def test_each_layout_is_found_and_what_cannot_be_told_is_refused(tmp_path, fp16):
    w, graph = weights_and_graph()
    path = saved_graph(graph, tmp_path / "model.onnx", fp16)
    places = map_weights(path, {name: sample_of(torch.from_numpy(value)) for name, value in w.items()})
    arrays = read_initializers(path)
    assert arrays["reorder"].dtype == (np.float16 if fp16 else np.float32)
    expected = {
        "proj.weight": "m.proj.weight",
        "lin.weight": "onnx::MatMul_1",
        "nhwc.weight": "NhwcConv_0_weight_NHWC",
        "blocked.weight": "reorder_token_1",
        "first.weight": "reorder",
        "attn.to_q.weight": "MatMul_QKV_0_weight",
        "attn.to_k.weight": "MatMul_QKV_0_weight",
        "attn.to_v.weight": "MatMul_QKV_0_weight",
        "tiny.weight": "m.tiny.weight",
    }
    assert {n: p["initializer"] for n, p in places.items() if p["initializer"]} == expected
    for name in expected:
        assert reproduces(places[name], w[name], arrays[places[name]["initializer"]]), name
    assert places["blocked.weight"]["view"][-2:] == [16, 16]  # the block told by the values
    assert places["first.weight"]["view"][-1] == 8
    assert [places[f"attn.to_{x}.weight"]["at"] for x in "qkv"] == [[None, None, r, None] for r in range(3)]
    assert places["lost.weight"] == {"initializer": None, "why": NOT_FOUND}
    assert places["twice.weight"]["initializer"] is None and "dup_a, dup_b" in places["twice.weight"]["why"]
    assert places["zero.weight"] == {
        "initializer": None,
        "why": "its values are all equal, so its place cannot be told by value",
    }
