"""Per-target graphs: what each holds, where each runs, and the runtime's refusals."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sdruntime import StableDiffusionPipeline
from sdruntime.manifest import read_manifest
from sdruntime.session import ProviderError

from sdexport import convert
from sdexport.cli import main

from .test_convert import COMPONENTS, latent_sizes, run_both

CUDA_UNET_FUSED_OPS = {"MultiHeadAttention", "GroupNorm", "NhwcConv", "BiasSplitGelu"}


def quiet_convert(out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert("tiny-sd", out, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def cuda16(tmp_path_factory):
    return quiet_convert(tmp_path_factory.mktemp("cuda") / "export", target="cuda", dtype="fp16")


@pytest.fixture(scope="module")
def trt32(tmp_path_factory):
    return quiet_convert(tmp_path_factory.mktemp("trt") / "export", target="tensorrt")


def op_types(path) -> dict[str, set[str]]:
    model = onnx.load(str(path))
    domains: dict[str, set[str]] = {}
    for node in model.graph.node:
        domains.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    return domains


def test_cuda_graphs_hold_the_fused_ops(cuda16):
    unet = op_types(cuda16 / "unet" / "model.onnx")
    assert CUDA_UNET_FUSED_OPS <= unet.get("com.microsoft", set())
    assert "Softmax" not in unet["ai.onnx"]  # every attention was fused
    vae = op_types(cuda16 / "vae_decoder" / "model.onnx")
    assert {"GroupNorm", "NhwcConv"} <= vae.get("com.microsoft", set())
    manifest = read_manifest(cuda16)
    assert manifest.target == "cuda" and manifest.components["unet"]["attention"] == "plain"
    assert manifest.components["unet"]["inputs"][1] == {"name": "timestep", "dtype": "float32", "shape": ["batch"]}


def test_cuda_graphs_do_not_load_on_the_cpu_ep(cuda16):
    with pytest.raises(Exception, match="NhwcConv|GroupNorm|implementation"):
        ort.InferenceSession(str(cuda16 / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_runtime_refuses_cuda_target_on_cpu(cuda16, capsys):
    with pytest.raises(ProviderError, match="targets 'cuda' and cannot run on CPUExecutionProvider"):
        StableDiffusionPipeline.load(cuda16, provider="cpu")
    from sdruntime.cli import main as runtime_main

    assert runtime_main(["generate", str(cuda16), "x"]) == 2
    assert "re-export with `sdexport convert --target generic`" in capsys.readouterr().err


def test_tensorrt_graphs_use_standard_ops_only_and_match(tiny_pipe, trt32):
    for component in COMPONENTS:
        domains = op_types(trt32 / component / "model.onnx")
        assert set(domains) == {"ai.onnx"}, domains.keys()
        expected, got = run_both(tiny_pipe, trt32, component, 2, latent_sizes(tiny_pipe)[0])
        for e, g in zip(expected, got):
            assert np.max(np.abs(e - g)) <= 1e-4
    # shape inference annotated the intermediate tensors
    model = onnx.load(str(trt32 / "unet" / "model.onnx"))
    assert len(model.graph.value_info) > len(model.graph.node) // 2


def test_tensorrt_refuses_fp16_onnx(capsys, tmp_path):
    assert main(["convert", "tiny-sd", "--target", "tensorrt", "--dtype", "fp16", "-o", str(tmp_path / "o")]) == 2
    assert "trt_fp16_enable" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fp16_on_cpu_warns(tiny16):
    with pytest.warns(UserWarning, match="fp16 graphs slower"):
        StableDiffusionPipeline.load(tiny16)


def test_inspect_prints_fusion_statistics(capsys, cuda16):
    assert main(["inspect", str(cuda16)]) == 0
    out = capsys.readouterr().out
    assert "com.microsoft.MultiHeadAttention:" in out and "com.microsoft.GroupNorm:" in out
