"""The runtime on Flux exports against diffusers' Flux(Img2Img|Inpaint)Pipeline (fp32, CPU): schnell (no guidance
input) and dev (embedded guidance, dynamic shifting), same prompts and seeds, same picture. The exports and the
reference pipelines are session fixtures in tests/conftest.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdruntime import StableDiffusionPipeline  # noqa: E402
from sdruntime.flux_latents import latent_image_ids, pack_latents, unpack_latents  # noqa: E402
from sdruntime.request import GenerationError, GenerationRequest  # noqa: E402

from .test_pipeline import psnr  # noqa: E402
from .test_sd3_pipeline import LATENT_ATOL, assert_matches, differ, draw, seeded  # noqa: E402

PROMPT = "a red circle on a blue background"
SIZE = {"height": 32, "width": 48}
SCHNELL = {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256, **SIZE}
DEV = {"num_inference_steps": 3, "max_sequence_length": 64, **SIZE}


@pytest.fixture(scope="module")
def schnell(flux_schnell32):
    return StableDiffusionPipeline.load(flux_schnell32)


@pytest.fixture(scope="module")
def dev(flux32):
    return StableDiffusionPipeline.load(flux32)


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 8, 255 - (x + y) * 3], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def mask_image() -> Image.Image:
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 12:40] = 255
    return Image.fromarray(mask)


def test_packing_is_diffusers():
    latents = torch.randn(2, 16, 8, 12, generator=seeded(0))
    packed = diffusers.FluxPipeline._pack_latents(latents, 2, 16, 8, 12).numpy()
    np.testing.assert_array_equal(pack_latents(latents.numpy()), packed)
    np.testing.assert_array_equal(unpack_latents(packed, 8, 12), latents.numpy())
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(latent_image_ids(8, 12), ids)


def test_schnell_matches_diffusers(flux_schnell_pipe, schnell):
    """Schnell as its users call it: 4 steps, guidance 0, 256 T5 tokens; no guidance input, static shift."""
    args = {"prompt": PROMPT, **SCHNELL}
    own = flux_schnell_pipe(generator=seeded(3), **args).images[
        0
    ]  # the pipeline's own decoding: draw() decodes the same
    theirs = draw(flux_schnell_pipe, generator=seeded(3), **args)
    mine = schnell(seed=3, **args)
    assert "guidance" not in schnell.component("transformer").inputs
    assert_matches(theirs, mine)
    assert psnr(own, mine.images[0]) >= 45.0
    assert mine.latents.shape == (1, 16, 16, 24)  # unpacked, as the VAE reads them
    assert differ(schnell(**{**args, "prompt": "a green square"}, seed=3), mine)
    assert differ(schnell(seed=4, **args), mine)


def test_schnell_per_image_seeds_match_diffusers_generators(flux_schnell_pipe, schnell):
    args = {"prompt": PROMPT, **SCHNELL}
    theirs = draw(flux_schnell_pipe, num_images_per_prompt=2, generator=[seeded(11), seeded(12)], **args)
    mine = schnell(num_images=2, seed=[11, 12], **args)
    assert_matches(theirs, mine)
    assert mine.seeds == [11, 12] and "Seed: 12" in mine.parameters[1]
    assert psnr(mine.images[0], mine.images[1]) < 35.0
    np.testing.assert_allclose(schnell(seed=12, **args).latents[0], mine.latents[1], rtol=0, atol=LATENT_ATOL)


def test_dev_defaults_match_diffusers(flux_pipe, dev):
    """Dev's defaults: guidance 3.5 embedded, T5 at 512 tokens, sigmas linspace(1, 1/n, n) shifted by mu."""
    args = {"prompt": PROMPT, "num_inference_steps": 3, **SIZE}
    theirs = draw(flux_pipe, generator=seeded(5), **args)
    mine = dev(seed=5, **args)
    assert_matches(theirs, mine)
    assert "Distilled CFG Scale: 3.5" in mine.parameters[0] and "Max sequence length: 512" in mine.parameters[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance_scale": 6.0},
        {"prompt_2": "a green bird in a tree"},
        {"negative_prompt": "blurry, green", "true_cfg_scale": 2.5},
        {"sigmas": [1.0, 0.6, 0.3]},
        {"height": 48, "width": 16},
    ],
    ids=["guidance", "t5-prompt", "true-cfg", "sigmas", "non-square"],
)
def test_dev_options_match_diffusers(flux_pipe, dev, kwargs):
    args = {"prompt": PROMPT, **DEV, **kwargs}
    theirs = draw(flux_pipe, generator=seeded(6), **args)
    mine = dev(seed=6, **args)
    assert_matches(theirs, mine)
    if "height" not in kwargs:
        assert differ(dev(PROMPT, seed=6, **DEV), mine)  # the option counts


def test_image_to_image_matches_diffusers(flux_pipe, dev, init_image):
    """FluxImg2ImgPipeline's defaults (strength 0.6, guidance 7.0); several generators encode the image with the
    first, as diffusers does."""
    cls = diffusers.FluxImg2ImgPipeline
    args = {"prompt": PROMPT, "image": init_image, **DEV, "num_inference_steps": 4}
    theirs = draw(flux_pipe, cls, generator=seeded(7), **args)
    mine = dev(seed=7, **args)
    assert_matches(theirs, mine)
    assert "Distilled CFG Scale: 7" in mine.parameters[0] and "Denoising strength: 0.6" in mine.parameters[0]
    assert differ(dev(seed=7, strength=0.9, **args), mine)
    theirs = draw(flux_pipe, cls, num_images_per_prompt=2, generator=[seeded(11), seeded(12)], **args)
    assert_matches(theirs, dev(num_images=2, seed=[11, 12], **args))


def test_inpainting_matches_diffusers(flux_pipe, dev, init_image, mask_image):
    cls = diffusers.FluxInpaintPipeline
    args = {"prompt": PROMPT, "image": init_image, **DEV, "num_inference_steps": 4}
    theirs = draw(flux_pipe, cls, mask_image=mask_image, generator=seeded(8), **args)
    mine = dev(mask_image=mask_image, seed=8, **args)
    assert_matches(theirs, mine)
    assert differ(dev(seed=8, **args), mine)  # the mask changed the picture


@pytest.mark.parametrize(
    ("request_args", "match"),
    [
        ({"clip_skip": 2}, "flux export does not take clip_skip"),
        ({"prompt_3": "a bird"}, "does not take prompt_3"),
        ({"width": 50}, "multiple of 4"),
        ({"prompt_embeds": np.zeros((1, 77, 32), np.float32)}, "does not take prompt_embeds"),
    ],
    ids=["clip-skip", "prompt-3", "size", "prompt-embeds"],
)
def test_bad_requests_are_refused_in_one_line(schnell, request_args, match):
    with pytest.raises(GenerationError, match=match) as caught:
        schnell.generate(GenerationRequest(PROMPT, **{**SCHNELL, **request_args}))
    assert "\n" not in str(caught.value)


def test_given_latents_and_callback_are_unpacked(flux_schnell_pipe, schnell):
    """`latents` and the callback's latents are [B, C, h, w] as `result.latents` are; diffusers takes them packed."""
    noise = np.random.default_rng(0).standard_normal((1, 16, 16, 24)).astype(np.float32)
    packed = diffusers.FluxPipeline._pack_latents(torch.from_numpy(noise), 1, 16, 16, 24)
    theirs = draw(flux_schnell_pipe, prompt=PROMPT, latents=packed, **SCHNELL)
    seen = []
    mine = schnell(PROMPT, latents=noise, callback=lambda *a: seen.append(a), **SCHNELL)
    assert_matches(theirs, mine)
    assert [step for step, _, _ in seen] == [0, 1, 2, 3]
    np.testing.assert_array_equal(seen[-1][2], mine.latents)
    assert "Latents: given" in mine.parameters[0]
