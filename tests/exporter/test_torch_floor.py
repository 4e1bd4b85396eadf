"""Exports that CI runs on pyproject.toml's torch floor (.ci/run) as well as on the pinned torch.

Static traces with the cuda target's plain attention: traced with constant shapes, torch folded
the empty [2 * batch * heads, tokens, tokens] input of its baddbmm into a constant, and torch's
per-op shape inference fails once such a constant reaches 1 GiB ("larger than the 2GiB limit
imposed by the protobuf library"), as one SD 1.5 image at 512x512 made it (--target cuda
--static), with torch 2.11 and 2.13 alike.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from sdruntime.manifest import axis_sizes, read_manifest

from sdexport import convert
from sdexport.compare import compare_outputs, reference_outputs
from sdexport.load import load_source
from sdexport.specs import model_dims, set_attention, vae_scale_factor
from sdexport.trace import trace


@pytest.fixture(scope="module")
def plain_pipe():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_source("tiny-sd").pipe
    set_attention(pipe, "plain")  # the cuda target's attention form
    return pipe


def static_unet(pipe, size: int, folder):
    facts = SimpleNamespace(
        family="sd1",
        transformer_family=False,
        vae_scale_factor=vae_scale_factor(pipe),
        tokenizer_max_length=model_dims(pipe)["max_length"],
    )
    fixed = axis_sizes(facts, "unet", 1, size, size)
    latent = (fixed["height"], fixed["width"])
    path = trace("unet", pipe, 17, fixed, latent, fixed["batch"], folder / "unet" / "model.onnx")
    return path, fixed["batch"], latent


def io_shapes(path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }


def test_static_trace_with_1gib_of_attention_scores(plain_pipe, tmp_path):
    # tiny-sd attends at half the latent size with 8 heads: at 1024x1024 (two images with guidance)
    # the baddbmm input is 16 x 4096 x 4096 floats, the 1 GiB of SD 1.5 at 512x512
    heads = plain_pipe.unet.config.attention_head_dim  # diffusers' legacy name for SD 1.x's head count
    assert 2 * heads * (1024 // 16) ** 4 * 4 == 2**30

    path, batch, (h, w) = static_unet(plain_pipe, 1024, tmp_path)  # ~12 s, < 3 GB

    assert io_shapes(path) == {
        "sample": [batch, 4, h, w],
        "timestep": [batch],
        "encoder_hidden_states": [batch, 77, 32],
        # a ControlNet's residuals: conv_in's and a resnet's at the latents' size, then halved
        "down_block_additional_residual_0": [batch, 32, h, w],
        "down_block_additional_residual_1": [batch, 32, h, w],
        "down_block_additional_residual_2": [batch, 32, h // 2, w // 2],
        "down_block_additional_residual_3": [batch, 64, h // 2, w // 2],
        "mid_block_additional_residual": [batch, 64, h // 2, w // 2],
        "out_sample": [batch, 4, h, w],
    }
    model = onnx.load(str(path), load_external_data=False)
    assert max(int(np.prod(t.dims)) for t in model.graph.initializer) < 2**20  # no shape-made constant


def test_static_plain_attention_trace_matches_pytorch(plain_pipe, tmp_path):
    path, batch, latent = static_unet(plain_pipe, 128, tmp_path)
    assert io_shapes(path)["sample"] == [batch, 4, *latent]
    result = compare_outputs(reference_outputs("unet", plain_pipe, batch, latent), path)
    assert result["finite"] and result["max_abs_diff"] < 1e-4, result


@pytest.mark.parametrize(
    "options",
    [
        {},  # the default: dynamic shapes, generic target, every component compared with PyTorch
        {"target": "cuda", "dtype": "fp16", "static": True, "batch_size": 1, "components": ["unet"]},
    ],
    ids=["dynamic", "static-cuda-fp16"],
)
def test_convert(options, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert("tiny-sd", tmp_path / "export", log=lambda s: None, **options)
    manifest = read_manifest(out)
    for name, entry in manifest.components.items():
        if options.get("target") != "cuda":  # the cuda target's graphs run on the CUDA EP only
            assert entry.export_max_abs_diff < 1e-3, name
        declared = {io.name: list(io.shape) for io in entry.inputs + entry.outputs}
        assert io_shapes(out / entry.path) == declared, name
