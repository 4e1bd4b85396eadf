"""`sdexport convert --tiny-vae` and `--vae` with a diffusers AutoencoderTiny: the graphs against PyTorch, the
manifest's facts and IO, fp16, refusals, and the random-weight tiny VAE presets."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sdruntime.manifest import TINY_DECODER, load_schema, read_manifest

from sdexport.errors import SdexportError
from sdexport.presets import available_presets, build_tiny_vae, build_tiny_vae_from_recipe, tiny_vae_presets

from ..conftest import _quiet_convert


def run_onnx(folder, component: str, **feeds: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.fixture(scope="module")
def taesd():
    return build_tiny_vae_from_recipe(tiny_vae_presets()["tiny-taesd"])


def test_tiny_vae_exports_its_decoder_beside_the_vae(tiny_taesd32, taesd):
    jsonschema = pytest.importorskip("jsonschema")
    manifest = read_manifest(tiny_taesd32)
    jsonschema.validate(json.loads((tiny_taesd32 / "sdexport.json").read_text()), load_schema())
    assert manifest.source.tiny_vae == "tiny-taesd" and manifest.source.vae == "pipeline"
    facts = manifest.pipeline
    assert facts.tiny_vae_scaling_factor == taesd.config.scaling_factor == 1.0
    assert facts.vae_scaling_factor == 0.18215 and facts.vae_tiny is None  # the VAE's own, untouched
    tiny, full = manifest.components[TINY_DECODER], manifest.components["vae_decoder"]
    assert (tiny.inputs, tiny.outputs) == (full.inputs, full.outputs)
    assert json.loads((tiny_taesd32 / TINY_DECODER / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    index = json.loads((tiny_taesd32 / "model_index.json").read_text())
    assert TINY_DECODER not in index and index["vae_decoder"] == ["diffusers", "AutoencoderKL"]
    for batch, (h, w) in ((1, (8, 8)), (2, (6, 10))):  # dynamic batch and size
        latents = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            expected = taesd.decode(latents).sample.numpy()
        got = run_onnx(tiny_taesd32, TINY_DECODER, latent_sample=latents.numpy())
        assert got.shape == (batch, 3, 8 * h, 8 * w) and np.max(np.abs(got - expected)) <= 1e-4


def test_vae_takes_a_tiny_vae_and_its_encoder_outputs_latents(tiny_vae_replaced32, tiny_vae_folder):
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(tiny_vae_folder)
    manifest = read_manifest(tiny_vae_replaced32)
    assert manifest.source.vae == str(tiny_vae_folder.resolve()) and manifest.source.tiny_vae is None
    assert manifest.pipeline.vae_tiny is True and manifest.pipeline.vae_scaling_factor == 0.5
    assert TINY_DECODER not in manifest.components
    (output,) = manifest.components["vae_encoder"].outputs
    assert (output.name, output.shape) == ("latents", ("batch", 4, "height", "width"))
    index = json.loads((tiny_vae_replaced32 / "model_index.json").read_text())
    assert index["vae_decoder"] == index["vae_encoder"] == ["diffusers", "AutoencoderTiny"]
    image = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoded, decoded = vae.encode(image).latents.numpy(), vae.decode(latents).sample.numpy()
    assert np.max(np.abs(run_onnx(tiny_vae_replaced32, "vae_encoder", sample=image.numpy()) - encoded)) <= 1e-4
    got = run_onnx(tiny_vae_replaced32, "vae_decoder", latent_sample=latents.numpy())
    assert np.max(np.abs(got - decoded)) <= 1e-4


def test_fp16_tiny_decoder_stays_finite_and_close(tmp_path, taesd):
    out = _quiet_convert("tiny-sd", tmp_path / "fp16", dtype="fp16", components=["vae_decoder"], tiny_vae="tiny-taesd")
    manifest = read_manifest(out)
    assert list(manifest.components) == ["vae_decoder", TINY_DECODER]
    assert manifest.components[TINY_DECODER].dtype == "fp16"
    # latents far past TAESD's range: the decoder's tanh clamp keeps fp16 finite
    for spread in (1.0, 30.0):
        latents = spread * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = taesd.decode(latents).sample.numpy()
        got = run_onnx(out, TINY_DECODER, latent_sample=latents.numpy().astype(np.float16)).astype(np.float32)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-2


def test_tiny_vae_presets_are_not_pipelines_and_draw_spread_pixels():
    assert {"taesd-random", "tiny-taesd"} <= set(tiny_vae_presets())
    assert not {"taesd-random", "tiny-taesd"} & set(available_presets())
    real = build_tiny_vae_from_recipe(tiny_vae_presets()["taesd-random"])
    decoder_parameters = sum(p.numel() for p in real.decoder.parameters())
    assert 1.1e6 < decoder_parameters < 1.3e6  # TAESD's decoder: 1.2M parameters
    with torch.no_grad():
        pixels = real.decode(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))).sample
    # neither flat nor clamped away: PyTorch's default initialization alone gave -0.98 +- 0.05
    assert abs(float(pixels.mean())) < 0.2 and 0.3 < float(pixels.std()) < 0.8
    assert float((pixels.abs() > 1).float().mean()) < 0.1


@pytest.mark.parametrize(
    "option, config, message",
    [
        ("tiny_vae", None, "is a AutoencoderKL: pass a diffusers AutoencoderTiny folder"),
        ("tiny_vae", {"latent_channels": 16}, "has 16 latent channels, the model's VAE 4"),
        (
            "vae",
            {"num_decoder_blocks": [1, 1], "decoder_block_out_channels": [8, 8]},
            "scales images by 2, the model's VAE by 8",
        ),
    ],
    ids=["not-tiny", "latent-channels", "scale-factor"],
)
def test_vaes_that_do_not_fit_are_refused_in_one_line(tmp_path, tiny_pipe, option, config, message):
    folder = tmp_path / "vae"
    if config is None:
        tiny_pipe.vae.save_pretrained(folder)  # an AutoencoderKL
    else:
        recipe = json.loads((tiny_vae_presets()["tiny-taesd"] / "recipe.json").read_text())
        build_tiny_vae({**recipe["config"], **config}).save_pretrained(folder)
    with pytest.raises(SdexportError, match=message) as info:
        _quiet_convert("tiny-sd", tmp_path / "out", components=["vae_decoder"], **{option: str(folder)})
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_tiny_vaes_are_refused_for_transformer_families(sd3_pipe, taesd):
    from sdexport.load import check_vae_fits

    with pytest.raises(SdexportError, match="tiny VAEs are supported for SD 1.x/2.x and SDXL exports, not SD3"):
        check_vae_fits(sd3_pipe, taesd, "--tiny-vae", "taesd")


def test_cli_refuses_a_missing_tiny_vae_before_loading(capsys, tmp_path):
    from .test_cli import assert_refused

    says = "--tiny-vae nothing-here: no config.json there; pass a diffusers AutoencoderTiny folder or a preset"
    assert_refused(capsys, tmp_path / "out", "tiny-sd", "--tiny-vae", "nothing-here", says=says)


@pytest.mark.slow  # an SDXL export and a diffusers run: about 40 s
def test_sdxl_with_a_tiny_decoder_draws_diffusers_picture(tmp_path, sdxl_pipe):
    from diffusers import StableDiffusionXLPipeline
    from sdruntime.pipeline import StableDiffusionPipeline

    recipe = json.loads((tiny_vae_presets()["tiny-taesd"] / "recipe.json").read_text())
    # sdxl-tiny's VAE scales by 2: a TAESDXL-shaped decoder with one upsampler
    config = {**recipe["config"], "num_decoder_blocks": [1, 1], "decoder_block_out_channels": [8, 8]}
    config.update({"num_encoder_blocks": [1, 1], "encoder_block_out_channels": [8, 8]})
    tiny = build_tiny_vae(config, seed=4)
    tiny.save_pretrained(tmp_path / "taesdxl")
    out = _quiet_convert("sdxl-tiny", tmp_path / "out", tiny_vae=str(tmp_path / "taesdxl"))
    ours = StableDiffusionPipeline.load(out)("a red circle", num_inference_steps=3, seed=2, decoder="tiny")
    reference = StableDiffusionXLPipeline(**{**sdxl_pipe.components, "vae": tiny})
    reference.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = reference("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(2)).images
    diff = np.asarray(ours.images[0], np.float64) - np.asarray(theirs[0], np.float64)
    assert 10 * np.log10(255**2 / max(float(np.mean(diff**2)), 1e-12)) >= 45.0


@pytest.mark.slow  # `sdexport validate` of every component and both modes: about 25 s
def test_validate_checks_the_tiny_decoder(tiny_taesd32):
    from sdexport.validate import validate

    report = validate("tiny-sd", str(tiny_taesd32), steps=3, log=lambda line: None)
    assert report["ok"] and TINY_DECODER in report["components"]
