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


# -- SDXL: StableDiffusionXLInpaintPipeline ------------------------------------------------------------------------

XL_SIZE = 32  # the tiny SDXL presets' default size: a 2x VAE, 16x16 latents
XL_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler"}


@pytest.fixture(scope="module")
def xl_image() -> Image.Image:
    y, x = np.mgrid[0:XL_SIZE, 0:XL_SIZE]
    rgb = np.stack([x * 8, y * 8, 255 - (x + y) * 4], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def xl_mask() -> Image.Image:
    """A repainted rectangle with soft values on its border, in grayscale."""
    y, x = np.mgrid[0:XL_SIZE, 0:XL_SIZE]
    inside = ((x > 9) & (x < 25) & (y > 5)).astype(np.float64)
    return Image.fromarray((np.where((x == 9) | (x == 25), 0.55, inside) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def aesthetic_inpaint_case(tmp_path_factory):
    """(pipeline, export) of tiny-sdxl-inpaint with requires_aesthetics_score (5 time ids: 5 x 8 + 32 = 72
    added-embedding inputs), saved as a diffusers folder and converted from it."""
    from ..conftest import _quiet_convert, build, recipe_of, saved

    root = tmp_path_factory.mktemp("sdxl-inpaint-aesthetic")
    recipe = recipe_of("tiny-sdxl-inpaint")
    unet = {**recipe["unet"], "projection_class_embeddings_input_dim": 72}
    pipe = build({**recipe, "unet": unet, "requires_aesthetics_score": True}, root / "recipe")
    return pipe, _quiet_convert(saved(pipe, root / "pipeline"), root / "export")


@pytest.fixture(scope="module")
def xl_cases(sdxl_pipe, sdxl32, tiny_sdxl_inpaint32, aesthetic_inpaint_case):
    """Case -> (the diffusers pipeline whose components draw it, its export, our pipeline on it)."""
    from sdexport.presets import build_from_recipe, resolve_preset

    found = {
        "9-channel": (build_from_recipe(resolve_preset("tiny-sdxl-inpaint")), tiny_sdxl_inpaint32),
        "4-channel": (sdxl_pipe, sdxl32),
        "9-channel-aesthetic": aesthetic_inpaint_case,
    }
    return {case: (pipe, export, StableDiffusionPipeline.load(export)) for case, (pipe, export) in found.items()}


def xl_reference(pipe, export, scheduler: str, **kwargs):
    """StableDiffusionXLInpaintPipeline from `pipe`'s components (a text-to-image pipeline's too, as diffusers
    lets one), with the export's scheduler config in the scheduler class asked for."""
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    ref = diffusers.StableDiffusionXLInpaintPipeline(
        **{**pipe.components, "scheduler": getattr(diffusers, XL_SCHEDULERS[scheduler]).from_config(config)},
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
        requires_aesthetics_score=bool(pipe.config.get("requires_aesthetics_score", False)),
        add_watermarker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref(**kwargs)


@pytest.mark.parametrize(
    ("case", "strength", "seed", "scheduler"),
    [
        pytest.param("9-channel", 1.0, 5, "euler", id="9-channel-strength-1"),
        pytest.param("9-channel", 0.6, 5, "euler", id="9-channel-strength-0.6"),
        # diffusers' default, 0.9999: the image's latents noised to the second step, not pure noise
        pytest.param("9-channel", None, 5, "euler", id="9-channel-default-strength"),
        pytest.param("4-channel", None, 5, "euler", id="4-channel-default-strength"),
        pytest.param("4-channel", 0.6, 5, "euler", id="4-channel-strength-0.6"),
        pytest.param("9-channel", None, [3, 4], "euler-a", id="9-channel-two-images-per-image-seeds"),
        pytest.param("4-channel", 1.0, [3, 4], "euler-a", id="4-channel-two-images-per-image-seeds"),
        pytest.param("9-channel-aesthetic", None, 5, "euler", id="9-channel-aesthetic-score"),
    ],
)
def test_sdxl_inpainting_matches_diffusers(xl_cases, xl_image, xl_mask, case, strength, seed, scheduler):
    pipe, export, ours = xl_cases[case]
    images = len(seed) if isinstance(seed, list) else 1
    generator = (
        [torch.Generator("cpu").manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator("cpu").manual_seed(seed)
    )
    # the guidance scale is left to the defaults: 7.5 for SDXL inpainting, not SDXL's 5.0
    args = {"num_inference_steps": 8, **({} if strength is None else {"strength": strength})}
    theirs = xl_reference(
        pipe,
        export,
        scheduler,
        prompt=PROMPT,
        image=xl_image,
        mask_image=xl_mask,
        generator=generator,
        num_images_per_prompt=images,
        **args,
    )
    mine = ours(PROMPT, image=xl_image, mask_image=xl_mask, seed=seed, scheduler=scheduler, num_images=images, **args)
    assert len(mine.images) == images
    for a, b in zip(theirs.images, mine.images):
        assert psnr(a, b) >= 45.0
    if images == 2:
        assert psnr(mine.images[0], mine.images[1]) < 45.0  # two different pictures


def test_sdxl_inpainting_fp16_keeps_the_vae_fp32(sdxl_pipe, sdxl16, xl_image, xl_mask):
    """SDXL's VAE says force_upcast: diffusers encodes and decodes in fp32, and the fp16 export keeps both fp32."""
    with pytest.warns(UserWarning, match="this export is fp16"):
        ours = StableDiffusionPipeline.load(sdxl16)
    assert {ours.manifest.components[n].dtype for n in ("vae_encoder", "vae_decoder")} == {"fp32"}
    args = {"num_inference_steps": 6, "strength": 0.6}
    generator = torch.Generator("cpu").manual_seed(5)
    theirs = xl_reference(
        sdxl_pipe, sdxl16, "euler", prompt=PROMPT, image=xl_image, mask_image=xl_mask, generator=generator, **args
    )
    mine = ours(PROMPT, image=xl_image, mask_image=xl_mask, seed=5, **args)
    assert psnr(theirs.images[0], mine.images[0]) >= 30.0


def test_sdxl_inpainting_export_records_its_channels(xl_cases):
    facts = xl_cases["9-channel"][2].manifest.pipeline
    assert (facts.family, facts.latent_channels, facts.unet_channels) == ("sdxl", 4, 9)
    assert not facts.requires_aesthetics_score
    assert xl_cases["9-channel-aesthetic"][2].manifest.pipeline.requires_aesthetics_score  # kept from the folder
    index = json.loads((xl_cases["9-channel"][1] / "model_index.json").read_text())
    assert index["_class_name"] == "ORTStableDiffusionXLInpaintPipeline"


def test_sdxl_inpainting_defaults_and_parameters(xl_cases, xl_image, xl_mask):
    result = xl_cases["4-channel"][2](PROMPT, image=xl_image, mask_image=xl_mask, seed=1, num_inference_steps=2)
    assert "CFG scale: 7.5" in result.parameters[0] and "Denoising strength: 0.9999" in result.parameters[0]
    assert "Mask hash: " in result.parameters[0]


def test_sdxl_mask_of_another_size_is_refused(xl_cases, xl_image):
    with pytest.raises(GenerationError, match=r"mask_image is 16x16, the image 32x32: give a mask of the image's size"):
        xl_cases["9-channel"][2](PROMPT, image=xl_image, mask_image=Image.new("L", (16, 16)), num_inference_steps=2)


def test_sdxl_nine_channel_export_needs_a_mask(xl_cases, xl_image):
    ours = xl_cases["9-channel"][2]
    with pytest.raises(GenerationError, match=r"U-Net inpaints \(9 input channels\): pass image and mask_image"):
        ours(PROMPT, image=xl_image, num_inference_steps=2)
