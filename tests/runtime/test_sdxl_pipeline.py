"""The runtime on SDXL and LCM exports against diffusers' pipelines (fp32, CPU): same prompt, same seed,
same picture. The exports are session fixtures in tests/conftest.py."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdruntime import StableDiffusionPipeline  # noqa: E402
from sdruntime.pipeline import GenerationError  # noqa: E402

from .test_pipeline import SCHEDULER_CLASSES, psnr  # noqa: E402

PROMPT = "a red circle on a blue background, top left"
LONG_PROMPT = "a small red circle and a large blue square on a green background, " * 8  # ~120 tokens


def reference_scheduler(export, name: str, **overrides):
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    cls_name, forced = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(config, **forced, **overrides)


def reference(pipe, export, name: str, img2img: bool = False, overrides: dict | None = None, **kwargs):
    """diffusers' SDXL pipeline (img2img: its Img2Img form) on the source's modules, `name` scheduler from the
    exported config; no watermark, as the runtime adds none."""
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    parts = {**pipe.components, "scheduler": reference_scheduler(export, name, **(overrides or {}))}
    ref = cls(**parts, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref(**kwargs).images[0]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def ours(sdxl32):
    return StableDiffusionPipeline.load(sdxl32)


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 8, y * 8, 255 - (x + y) * 4], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("scheduler", ["euler", "euler-a", "dpm++2m"])
def test_text_to_image_matches_diffusers(sdxl_pipe, sdxl32, ours, scheduler):
    theirs = reference(sdxl_pipe, sdxl32, scheduler, prompt=PROMPT, num_inference_steps=6, generator=seeded(3))
    mine = ours(PROMPT, num_inference_steps=6, scheduler=scheduler, seed=3)
    assert psnr(theirs, mine.images[0]) >= 45.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"negative_prompt": "blurry, green"},
        {"negative_prompt": ""},  # an explicit "" is encoded; no negative prompt gives zeros
        {"height": 32, "width": 64},
        {"prompt": LONG_PROMPT},
        {"guidance_scale": 7.5, "clip_skip": 2},
        {
            "original_size": (128, 64),
            "crops_coords_top_left": (8, 4),
            "target_size": (32, 48),
            "negative_original_size": (16, 16),
            "negative_target_size": (64, 64),
        },
    ],
    ids=["negative", "empty-negative", "non-square", "long-prompt", "clip-skip", "micro-conditioning"],
)
def test_prompt_options_match_diffusers(sdxl_pipe, sdxl32, ours, kwargs):
    kwargs = {"prompt": PROMPT, **kwargs}
    theirs = reference(sdxl_pipe, sdxl32, "euler", num_inference_steps=5, generator=seeded(4), **kwargs)
    long = kwargs["prompt"] is LONG_PROMPT
    with pytest.warns(UserWarning, match="tokens long") if long else contextlib.nullcontext():
        mine = ours(num_inference_steps=5, scheduler="euler", seed=4, **kwargs)
    assert psnr(theirs, mine.images[0]) >= 45.0


def test_no_negative_prompt_differs_from_an_empty_one(ours):
    # force_zeros_for_empty_prompt: diffusers tells the two apart, and so must the runtime
    assert ours.manifest.pipeline.force_zeros_for_empty_prompt
    zeros = ours(PROMPT, num_inference_steps=3, seed=1).latents
    empty = ours(PROMPT, negative_prompt="", num_inference_steps=3, seed=1).latents
    assert np.abs(zeros - empty).max() > 1e-3


def test_two_images_per_prompt_match_diffusers(sdxl_pipe, sdxl32, ours):
    ref_args = {"prompt": PROMPT, "num_images_per_prompt": 2, "num_inference_steps": 4}
    cls = diffusers.StableDiffusionXLPipeline
    ref = cls(**{**sdxl_pipe.components, "scheduler": reference_scheduler(sdxl32, "euler-a")}, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(generator=[seeded(5), seeded(6)], **ref_args).images
    mine = ours(PROMPT, num_images=2, num_inference_steps=4, scheduler="euler-a", seed=[5, 6])
    for a, b in zip(theirs, mine.images):
        assert psnr(a, b) >= 45.0


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
def test_image_to_image_matches_diffusers(sdxl_pipe, sdxl32, ours, init_image, scheduler):
    args = {"num_inference_steps": 10, "strength": 0.6}
    theirs = reference(
        sdxl_pipe, sdxl32, scheduler, img2img=True, prompt=PROMPT, image=init_image, generator=seeded(7), **args
    )
    mine = ours(PROMPT, image=init_image, scheduler=scheduler, seed=7, **args)
    assert psnr(theirs, mine.images[0]) >= 45.0


def test_image_to_image_default_strength_is_diffusers_xl(sdxl_pipe, sdxl32, ours, init_image):
    theirs = reference(
        sdxl_pipe,
        sdxl32,
        "euler",
        img2img=True,
        prompt=PROMPT,
        image=init_image,
        num_inference_steps=10,
        generator=seeded(8),
    )
    mine = ours(PROMPT, image=init_image, scheduler="euler", num_inference_steps=10, seed=8)
    assert "Denoising strength: 0.3" in mine.parameters[0]
    assert psnr(theirs, mine.images[0]) >= 45.0


@pytest.mark.parametrize("negative", [None, "dark"])
def test_refiner_with_aesthetic_scores_matches_diffusers(refiner_case, init_image, negative):
    _, pipe, export = refiner_case
    mine_pipe = StableDiffusionPipeline.load(export)
    assert mine_pipe.encoders == ("text_encoder_2",)
    args = {
        "num_inference_steps": 8,
        "strength": 0.5,
        "aesthetic_score": 7.0,
        "negative_aesthetic_score": 2.0,
        "negative_prompt": negative,
    }
    flags = {k: pipe.config[k] for k in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")}
    ref = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components, **flags, add_watermarker=False)
    ref.scheduler = reference_scheduler(export, "euler")
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt=PROMPT, image=init_image, generator=seeded(9), **args).images[0]
    mine = mine_pipe(PROMPT, image=init_image, scheduler="euler", seed=9, **args)
    assert psnr(theirs, mine.images[0]) >= 45.0


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_few_steps_without_guidance(turbo_case, steps):
    """SDXL-Turbo's way: Euler ancestral with trailing spacing from the source's own scheduler config,
    guidance_scale 0, one U-Net batch per step (no unconditional half)."""
    pipe, export = turbo_case
    ours = StableDiffusionPipeline.load(export)
    assert ours.default_scheduler == "euler-a" and ours.scheduler_config["timestep_spacing"] == "trailing"
    ref = diffusers.StableDiffusionXLPipeline(**pipe.components, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt=PROMPT, num_inference_steps=steps, guidance_scale=0.0, generator=seeded(10)).images[0]

    batches = []
    unet = ours.component("unet")
    bind = unet.bind
    unet.bind = lambda feeds: batches.append(feeds["sample"].shape[0]) or bind(feeds)
    with pytest.warns(UserWarning, match="turns classifier-free guidance off"):
        mine = ours(PROMPT, num_inference_steps=steps, guidance_scale=0.0, seed=10)
    assert batches == [1]
    assert psnr(theirs, mine.images[0]) >= 45.0


@pytest.mark.parametrize("guidance_scale", [1.0, 8.0])
def test_lcm_unet_matches_diffusers(lcm_case, guidance_scale):
    """An LCM-distilled U-Net takes guidance as timestep_cond (w - 1 embedded), never as a second batch."""
    _, pipe, export = lcm_case
    ours = StableDiffusionPipeline.load(export)
    ref = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": reference_scheduler(export, "lcm")})
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt=PROMPT, num_inference_steps=4, guidance_scale=guidance_scale, generator=seeded(11)).images[0]
    mine = ours(PROMPT, num_inference_steps=4, guidance_scale=guidance_scale, scheduler="lcm", seed=11)
    assert psnr(theirs, mine.images[0]) >= 45.0


def test_sdxl_refuses_what_only_sd_takes(ours):
    with pytest.raises(GenerationError, match="pooled embeddings"):
        ours(None, prompt_embeds=np.zeros((1, 77, 64), np.float32), num_inference_steps=2)


def test_sd_refuses_micro_conditioning(tiny32):
    sd = StableDiffusionPipeline.load(tiny32)
    with pytest.raises(GenerationError, match="SDXL exports only"):
        sd(PROMPT, num_inference_steps=2, original_size=(64, 64))


def test_interpolate_refuses_sdxl_in_one_line(ours):
    from sdruntime.interpolate import pairwise

    with pytest.raises(GenerationError, match="SDXL's pooled ones are not handled yet"):
        pairwise(ours, "a red circle", "a blue square", 2, num_inference_steps=2)
