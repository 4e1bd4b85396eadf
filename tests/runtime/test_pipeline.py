"""The runtime pipeline against diffusers' own pipelines: same prompt, seed and scheduler, same picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sdruntime import StableDiffusionPipeline
from sdruntime.image import load_init_image
from sdruntime.pipeline import GenerationError

pytest.importorskip("ftfy")  # the reference tokenizer must read prompts as CLIP does (sdruntime/tokenizer.py)
diffusers = pytest.importorskip("diffusers")

SCHEDULER_CLASSES = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
PROMPT, NEGATIVE = "a red circle on a blue background, top left", "blurry"


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = np.mean((x - y) ** 2)
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0**2 / mse))


def reference_scheduler(export, name: str):
    """diffusers' class built from the exported scheduler_config.json itself (never from another scheduler)."""
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    cls_name, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def reference(pipe, export, name, img2img=False, **kwargs):
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    components = {**pipe.components, "scheduler": reference_scheduler(export, name)}
    ref = cls(**components)
    ref.set_progress_bar_config(disable=True)
    return ref(**kwargs)


@pytest.fixture(scope="module")
def ours(tiny32):
    return StableDiffusionPipeline.load(tiny32)


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("scheduler", list(SCHEDULER_CLASSES))
def test_text_to_image_matches_diffusers(tiny_pipe, tiny32, ours, scheduler):
    args = {"num_inference_steps": 10, "guidance_scale": 7.5}
    theirs = reference(
        tiny_pipe,
        tiny32,
        scheduler,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        generator=torch.Generator("cpu").manual_seed(11),
        **args,
    )
    mine = ours(PROMPT, negative_prompt=NEGATIVE, seed=11, scheduler=scheduler, **args)
    assert psnr(theirs.images[0], mine.images[0]) >= 45.0


@pytest.mark.parametrize("scheduler", list(SCHEDULER_CLASSES))
def test_image_to_image_matches_diffusers(tiny_pipe, tiny32, ours, init_image, scheduler):
    args = {"num_inference_steps": 10, "guidance_scale": 7.5, "strength": 0.6}
    theirs = reference(
        tiny_pipe,
        tiny32,
        scheduler,
        img2img=True,
        prompt=PROMPT,
        image=init_image,
        generator=torch.Generator("cpu").manual_seed(5),
        **args,
    )
    mine = ours(PROMPT, image=init_image, seed=5, scheduler=scheduler, **args)
    assert psnr(theirs.images[0], mine.images[0]) >= 45.0


@pytest.mark.parametrize("seed", [3, [3, 4]], ids=["int-seed", "list-of-seeds"])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_two_images_match_diffusers(tiny_pipe, tiny32, ours, init_image, seed, img2img):
    generator = (
        [torch.Generator("cpu").manual_seed(s) for s in seed]
        if isinstance(seed, list)
        else torch.Generator("cpu").manual_seed(seed)
    )
    extra = {"image": init_image, "strength": 0.7} if img2img else {}
    theirs = reference(
        tiny_pipe,
        tiny32,
        "euler-a",
        img2img=img2img,
        prompt=PROMPT,
        num_images_per_prompt=2,
        num_inference_steps=8,
        generator=generator,
        **extra,
    )
    mine = ours(PROMPT, num_images=2, num_inference_steps=8, scheduler="euler-a", seed=seed, **extra)
    assert len(mine.images) == 2
    for a, b in zip(theirs.images, mine.images):
        assert psnr(a, b) >= 45.0
    assert psnr(mine.images[0], mine.images[1]) < 45.0  # two different pictures


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_two_prompts_and_no_guidance(tiny_pipe, tiny32, ours, scheduler):
    # euler scales the U-Net's input: unguided, the bound input buffer must not be the latents themselves
    prompts = [PROMPT, "a green star"]
    theirs = reference(
        tiny_pipe,
        tiny32,
        scheduler,
        prompt=prompts,
        num_inference_steps=6,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(2),
    )
    mine = ours(prompts, num_inference_steps=6, guidance_scale=1.0, scheduler=scheduler, seed=2)
    for a, b in zip(theirs.images, mine.images):
        assert psnr(a, b) >= 45.0


def test_other_layout_v_prediction_matches_diffusers(sd2_case):
    _, pipe, export = sd2_case
    mine = StableDiffusionPipeline.load(export)
    for scheduler in ("ddim", "euler", "dpm++2m"):
        theirs = reference(
            pipe,
            export,
            scheduler,
            prompt=PROMPT,
            num_inference_steps=8,
            generator=torch.Generator("cpu").manual_seed(1),
        )
        image = mine(PROMPT, num_inference_steps=8, scheduler=scheduler, seed=1).images[0]
        assert psnr(theirs.images[0], image) >= 45.0


def test_latents_eta_and_callback(tiny_pipe, tiny32, ours):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(9))
    theirs = reference(
        tiny_pipe,
        tiny32,
        "ddim",
        prompt=PROMPT,
        latents=noise,
        eta=0.5,
        num_inference_steps=5,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="latent",
    )
    seen = []
    mine = ours(
        PROMPT,
        latents=noise.numpy(),
        eta=0.5,
        num_inference_steps=5,
        scheduler="ddim",
        seed=1,
        callback=lambda i, t, x: seen.append((i, t)),
    )
    assert np.max(np.abs(theirs.images.numpy() - mine.latents)) <= 1e-4
    assert [i for i, _ in seen] == list(range(5))


def test_default_scheduler_is_the_exported_one(ours):
    assert ours.default_scheduler == "pndm"
    result = ours(PROMPT, num_inference_steps=2, seed=0)
    assert "Sampler: pndm" in result.parameters[0]


def test_png_parameters(ours, tmp_path):
    result = ours(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, seed=7, scheduler="euler")
    path = result.save(tmp_path / "out.png")[0]
    text = Image.open(path).text["parameters"]
    assert text.splitlines()[0] == PROMPT
    assert f"Negative prompt: {NEGATIVE}" in text
    for field in ("Steps: 2", "Sampler: euler", "CFG scale: 7.5", "Seed: 7", "Size: 64x64", "Model: tiny-sd"):
        assert field in text


def test_io_binding_equals_plain_run(tiny32, ours):
    unet = ours.component("unet")
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.array([500.0, 500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    bound = unet.bind(feeds).run()["out_sample"]
    plain = unet.session.run(["out_sample"], feeds)[0]
    np.testing.assert_array_equal(bound, plain)
    binding = unet.bind(feeds)  # updated in place, as in the denoising loop
    binding.update("timestep", np.array([10.0, 10.0], np.float32))
    np.testing.assert_array_equal(
        binding.run()["out_sample"],
        unet.session.run(["out_sample"], {**feeds, "timestep": np.full(2, 10.0, np.float32)})[0],
    )


def test_long_prompt_warns_with_dropped_count(ours):
    with pytest.warns(UserWarning, match="the last 25 were dropped"):
        ids = ours.tokenizer(["word " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_fp16_export_runs_close_to_fp32(tiny16, ours):
    half = StableDiffusionPipeline.load(tiny16)
    a = ours(PROMPT, num_inference_steps=5, seed=0, scheduler="euler").images[0]
    b = half(PROMPT, num_inference_steps=5, seed=0, scheduler="euler").images[0]
    assert psnr(a, b) >= 30.0


def test_static_export_pads_its_batch(tmp_path):
    from sdexport import convert

    out = convert("tiny-sd", tmp_path / "static", static=True, batch_size=1, height=64, width=64, log=lambda s: None)
    pipe = StableDiffusionPipeline.load(out)
    guided = pipe(PROMPT, num_inference_steps=3, seed=0, scheduler="ddim")
    unguided = pipe(PROMPT, num_inference_steps=3, seed=0, scheduler="ddim", guidance_scale=1.0)
    assert guided.latents.shape == unguided.latents.shape == (1, 4, 8, 8)
    assert np.isfinite(unguided.latents).all()


def test_init_image_resized_like_diffusers(init_image):
    from diffusers.image_processor import VaeImageProcessor

    big = init_image.resize((80, 48))
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(big, height=64, width=64).numpy()
    np.testing.assert_allclose(load_init_image(big, 64, 64), theirs, atol=1e-6)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(tiny_pipe, tiny32, ours, clip_skip):
    theirs = reference(
        tiny_pipe,
        tiny32,
        "euler",
        prompt=PROMPT,
        clip_skip=clip_skip,
        num_inference_steps=6,
        generator=torch.Generator("cpu").manual_seed(4),
    )
    mine = ours(PROMPT, clip_skip=clip_skip, num_inference_steps=6, scheduler="euler", seed=4)
    plain = ours(PROMPT, num_inference_steps=6, scheduler="euler", seed=4)
    assert psnr(theirs.images[0], mine.images[0]) >= 45.0
    assert psnr(plain.images[0], mine.images[0]) < 45.0  # clip_skip changed the picture


def test_clip_skip_out_of_range(ours):

    with pytest.raises(GenerationError, match="clip_skip must be between 1 and 5"):
        ours(PROMPT, clip_skip=6, num_inference_steps=1)


def test_prompt_embeds_stand_for_the_prompt(ours):
    """As in diffusers, prompt_embeds may replace the prompt altogether (interpolate passes no prompt)."""
    embeds = ours.encode_prompt(["a red circle"], None, 1)
    args = dict(num_inference_steps=2, seed=3, scheduler="euler-a")
    with_text = ours("a red circle", **args)
    without = ours(None, prompt_embeds=embeds, **args)
    np.testing.assert_array_equal(with_text.latents, without.latents)
    assert without.parameters[0].splitlines()[0] == "" and "Prompt embeds: given" in without.parameters[0]
    with pytest.raises(GenerationError, match="give a prompt, or prompt_embeds"):
        ours(None, num_inference_steps=1)
    with pytest.raises(GenerationError, match="2 prompt embeddings for 1 prompts"):
        ours("a", prompt_embeds=np.concatenate([embeds, embeds]), num_inference_steps=1)
