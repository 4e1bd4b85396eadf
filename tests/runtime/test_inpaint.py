"""Inpainting against diffusers' StableDiffusionInpaintPipeline: a 9-channel U-Net (the tiny-sd-inpaint
preset) and a plain 4-channel one (tiny-sd), which blends the kept region back after each step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sdruntime import StableDiffusionPipeline
from sdruntime.inpaint import load_mask, mask_to_latents
from sdruntime.pipeline import GenerationError

pytest.importorskip("ftfy")  # the reference tokenizer must read prompts as CLIP does (sdruntime/tokenizer.py)
diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle on a blue background, top left"
SCHEDULERS = {"pndm": "PNDMScheduler", "euler-a": "EulerAncestralDiscreteScheduler"}


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = np.mean((x - y) ** 2)
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def mask_image() -> Image.Image:
    """A white rectangle (repainted) on black (kept), in RGB with soft values on its border to test the binarizing."""
    y, x = np.mgrid[0:64, 0:64]
    inside = ((x > 20) & (x < 50) & (y > 12)).astype(np.float64)
    soft = np.where((x == 20) | (x == 50), 0.45, inside)
    gray = (soft * 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


@pytest.fixture(scope="module")
def cases(tiny32, tiny_inpaint32):
    """Preset name -> (its diffusers pipeline, its export, our pipeline on it)."""
    from sdexport.presets import build_from_recipe, resolve_preset

    return {
        preset: (build_from_recipe(resolve_preset(preset)), export, StableDiffusionPipeline.load(export))
        for preset, export in (("tiny-sd-inpaint", tiny_inpaint32), ("tiny-sd", tiny32))
    }


def reference(pipe, export, scheduler: str, **kwargs):
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(config)
    ref = diffusers.StableDiffusionInpaintPipeline(**{**pipe.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    return ref(**kwargs)


@pytest.mark.parametrize("seed", [5, [3, 4]], ids=["one-image", "two-images-per-image-seeds"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("preset", ["tiny-sd-inpaint", "tiny-sd"], ids=["9-channel", "4-channel"])
def test_inpainting_matches_diffusers(cases, init_image, mask_image, preset, scheduler, strength, seed):
    pipe, export, ours = cases[preset]
    images = len(seed) if isinstance(seed, list) else 1
    generator = (
        [torch.Generator("cpu").manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator("cpu").manual_seed(seed)
    )
    args = {"num_inference_steps": 10, "guidance_scale": 7.5, "strength": strength}
    theirs = reference(
        pipe,
        export,
        scheduler,
        prompt=PROMPT,
        image=init_image,
        mask_image=mask_image,
        generator=generator,
        num_images_per_prompt=images,
        **args,
    )
    mine = ours(
        PROMPT, image=init_image, mask_image=mask_image, seed=seed, scheduler=scheduler, num_images=images, **args
    )
    assert len(mine.images) == images
    for a, b in zip(theirs.images, mine.images):
        assert psnr(a, b) >= 45.0
    if images == 2:
        assert psnr(mine.images[0], mine.images[1]) < 45.0  # two different pictures


def test_mask_processed_like_diffusers(mask_image):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    theirs = processor.preprocess(mask_image, height=64, width=64)
    mine = load_mask(mask_image, 64, 64)
    np.testing.assert_array_equal(mine, theirs.numpy())
    latent = torch.nn.functional.interpolate(theirs, size=(8, 8)).numpy()
    np.testing.assert_array_equal(mask_to_latents(mine, 8), latent)


def test_inpainting_export_records_its_channels(cases):
    facts = cases["tiny-sd-inpaint"][2].manifest.pipeline
    assert (facts.latent_channels, facts.unet_in_channels, facts.unet_channels) == (4, 9, 9)
    unet = cases["tiny-sd-inpaint"][2].manifest.components["unet"]
    assert [tensor.shape[1] for tensor in unet.inputs if tensor.name == "sample"] == [9]
    assert cases["tiny-sd"][2].manifest.pipeline.unet_channels == 4


def test_mask_of_another_size_is_refused(cases, init_image):
    ours = cases["tiny-sd"][2]
    with pytest.raises(GenerationError, match=r"mask_image is 32x32, the image 64x64"):
        ours(PROMPT, image=init_image, mask_image=Image.new("L", (32, 32)), num_inference_steps=2)


def test_nine_channel_export_needs_a_mask(cases, init_image):
    ours = cases["tiny-sd-inpaint"][2]
    with pytest.raises(GenerationError, match=r"U-Net inpaints \(9 input channels\): pass image and mask_image"):
        ours(PROMPT, num_inference_steps=2)
    with pytest.raises(GenerationError, match="pass image and mask_image"):
        ours(PROMPT, image=init_image, num_inference_steps=2)


def test_mask_needs_an_image(cases, mask_image):
    with pytest.raises(GenerationError, match="mask_image needs the image to inpaint"):
        cases["tiny-sd"][2](PROMPT, mask_image=mask_image, num_inference_steps=2)


def test_parameters_record_the_mask(cases, init_image, mask_image):
    result = cases["tiny-sd"][2](PROMPT, image=init_image, mask_image=mask_image, seed=1, num_inference_steps=2)
    assert "Mask hash: " in result.parameters[0] and "Denoising strength: 1" in result.parameters[0]
