"""ControlNet against diffusers' StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline, fp32 on the CPU: one
ControlNet, two stacked at different scales, guess mode, control_guidance_start/end, image-to-image,
inpainting (4- and 9-channel U-Nets), per-image seeds and SDXL. The ControlNets are small random ones (the
tiny-controlnet presets, and one saved as a diffusers folder), exported beside the tiny pipelines."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sdruntime import StableDiffusionPipeline
from sdruntime.control import load_control_image
from sdruntime.request import GenerationError

from tests.conftest import REPO, _quiet_convert

pytest.importorskip("ftfy")  # the reference tokenizer must read prompts as CLIP does (sdruntime/tokenizer.py)
diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle on a blue background, top left"
STEPS = 6


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = np.mean((x - y) ** 2)
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0**2 / mse))


def pattern(size: int, seed: int) -> Image.Image:
    """A control image: random blocks, as edges or depth would be, at `size` pixels."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))


def controlnet_with_seed(folder, preset: str, seed: int):
    """The preset's ControlNet built with another seed: a second, different ControlNet."""
    from sdexport.presets import build_controlnet_from_recipe

    recipe = json.loads((REPO / "models" / preset / "recipe.json").read_text())
    recipe = {**recipe, "seed": seed, "for": str(REPO / "models" / recipe["for"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.json").write_text(json.dumps(recipe))
    return build_controlnet_from_recipe(folder)


@pytest.fixture(scope="module")
def sd_case(tmp_path_factory):
    """(diffusers pipeline, ControlNets by name, export with both, our pipeline, the inpainting ones)."""
    from sdexport.presets import build_controlnet_from_recipe, build_from_recipe, controlnet_presets, resolve_preset

    root = tmp_path_factory.mktemp("controlnet")
    nets = {"edges": build_controlnet_from_recipe(controlnet_presets()["tiny-controlnet"])}
    nets["depth"] = controlnet_with_seed(root / "recipe", "tiny-controlnet", 99)
    nets["depth"].save_pretrained(root / "depth")
    extra = ["edges=tiny-controlnet", f"depth={root / 'depth'}"]
    export = _quiet_convert("tiny-sd", root / "export", controlnets=extra)
    inpaint = _quiet_convert("tiny-sd-inpaint", root / "inpaint", controlnets=["edges=tiny-controlnet"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipes = {p: build_from_recipe(resolve_preset(p)) for p in ("tiny-sd", "tiny-sd-inpaint")}
    ours = {"tiny-sd": StableDiffusionPipeline.load(export), "tiny-sd-inpaint": StableDiffusionPipeline.load(inpaint)}
    return pipes, nets, ours


def reference(cls, pipe, export, nets, **kwargs):
    config = json.loads((export.folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    ref = getattr(diffusers, cls)(**{**pipe.components, "scheduler": scheduler, "controlnet": controlnet})
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return ref(**kwargs).images


def generators(seed):
    if isinstance(seed, list):
        return [torch.Generator("cpu").manual_seed(s) for s in seed]
    return torch.Generator("cpu").manual_seed(seed)


CASES = {
    "one": dict(names=["edges"], scale=0.9),
    "two-stacked": dict(names=["edges", "depth"], scale=[0.6, 1.3]),
    "guess-mode": dict(names=["edges"], scale=1.0, guess_mode=True),
    "guidance-span": dict(names=["edges", "depth"], scale=[1.0, 0.8], start=[0.2, 0.0], end=[0.7, 0.5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_text_to_image_matches_diffusers(sd_case, case):
    pipes, nets, ours = sd_case
    spec = CASES[case]
    names = spec["names"]
    images = [pattern(64, i) for i in range(len(names))]
    common = dict(num_inference_steps=STEPS, guidance_scale=7.5, guess_mode=spec.get("guess_mode", False))
    span = {"control_guidance_start": spec.get("start", 0.0), "control_guidance_end": spec.get("end", 1.0)}
    ours_pipe = ours["tiny-sd"]
    theirs = reference(
        "StableDiffusionControlNetPipeline",
        pipes["tiny-sd"],
        ours_pipe,
        [nets[n] for n in names],
        prompt=PROMPT,
        image=images if len(names) > 1 else images[0],
        controlnet_conditioning_scale=spec["scale"],
        generator=generators(7),
        **common,
        **span,
    )
    mine = ours_pipe(
        PROMPT,
        seed=7,
        scheduler="euler-a",
        control_image=images,
        controlnet=names,
        controlnet_conditioning_scale=spec["scale"],
        **common,
        **span,
    )
    assert psnr(theirs[0], mine.images[0]) >= 45.0, psnr(theirs[0], mine.images[0])
    plain = ours_pipe(PROMPT, seed=7, scheduler="euler-a", num_inference_steps=STEPS, guidance_scale=7.5)
    assert psnr(plain.images[0], mine.images[0]) < 45.0  # the ControlNets changed the picture


def test_image_to_image_with_controlnet_matches_diffusers(sd_case):
    pipes, nets, ours = sd_case
    init, control = pattern(64, 5), pattern(64, 0)
    args = dict(num_inference_steps=STEPS, guidance_scale=6.0, strength=0.6, controlnet_conditioning_scale=0.8)
    theirs = reference(
        "StableDiffusionControlNetImg2ImgPipeline",
        pipes["tiny-sd"],
        ours["tiny-sd"],
        [nets["edges"]],
        prompt=PROMPT,
        image=init,
        control_image=control,
        generator=generators(3),
        **args,
    )
    mine = ours["tiny-sd"](
        PROMPT, image=init, control_image=control, controlnet="edges", seed=3, scheduler="euler-a", **args
    )
    assert psnr(theirs[0], mine.images[0]) >= 45.0, psnr(theirs[0], mine.images[0])


@pytest.mark.parametrize("preset", ["tiny-sd-inpaint", "tiny-sd"], ids=["9-channel", "4-channel"])
def test_inpainting_with_controlnet_matches_diffusers(sd_case, preset):
    pipes, nets, ours = sd_case
    init, control = pattern(64, 5), pattern(64, 0)
    y, x = np.mgrid[0:64, 0:64]
    mask = Image.fromarray((((x > 16) & (y > 20)) * 255).astype(np.uint8))
    args = dict(num_inference_steps=STEPS, guidance_scale=7.5, strength=0.8)
    theirs = reference(
        "StableDiffusionControlNetInpaintPipeline",
        pipes[preset],
        ours[preset],
        [nets["edges"]],
        prompt=PROMPT,
        image=init,
        mask_image=mask,
        control_image=control,
        generator=generators(4),
        **args,
    )
    mine = ours[preset](
        PROMPT,
        image=init,
        mask_image=mask,
        control_image=control,
        controlnet="edges",
        seed=4,
        scheduler="euler-a",
        **args,
    )
    assert psnr(theirs[0], mine.images[0]) >= 45.0, psnr(theirs[0], mine.images[0])


def test_two_images_with_per_image_seeds_match_diffusers(sd_case):
    pipes, nets, ours = sd_case
    control = pattern(64, 1)
    args = dict(num_inference_steps=STEPS, guidance_scale=7.5, controlnet_conditioning_scale=1.1)
    theirs = reference(
        "StableDiffusionControlNetPipeline",
        pipes["tiny-sd"],
        ours["tiny-sd"],
        [nets["depth"]],
        prompt=PROMPT,
        image=control,
        num_images_per_prompt=2,
        generator=generators([11, 12]),
        **args,
    )
    mine = ours["tiny-sd"](
        PROMPT, control_image=control, controlnet="depth", seed=[11, 12], num_images=2, scheduler="euler-a", **args
    )
    for a, b in zip(theirs, mine.images):
        assert psnr(a, b) >= 45.0
    assert psnr(mine.images[0], mine.images[1]) < 45.0


def test_sdxl_controlnet_matches_diffusers(tmp_path_factory, sdxl_pipe):
    from sdexport.presets import build_controlnet_from_recipe, controlnet_presets

    root = tmp_path_factory.mktemp("sdxl-controlnet")
    export = _quiet_convert("sdxl-tiny", root / "export", controlnets=["tiny-sdxl-controlnet"])
    net = build_controlnet_from_recipe(controlnet_presets()["tiny-sdxl-controlnet"])
    ours = StableDiffusionPipeline.load(export)
    control = pattern(128, 2)
    args = dict(num_inference_steps=STEPS, guidance_scale=5.0, controlnet_conditioning_scale=0.7)
    theirs = reference(
        "StableDiffusionXLControlNetPipeline",
        sdxl_pipe,
        ours,
        [net],
        prompt=PROMPT,
        image=control,
        generator=generators(9),
        **args,
    )
    mine = ours(PROMPT, control_image=control, seed=9, scheduler="euler-a", **args)
    assert psnr(theirs[0], mine.images[0]) >= 45.0, psnr(theirs[0], mine.images[0])


def test_control_image_processed_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    image = pattern(96, 3)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    theirs = processor.preprocess(image, height=64, width=64).numpy()
    np.testing.assert_allclose(load_control_image(image, 64, 64), theirs, atol=1e-6)


def test_bad_control_requests_are_one_line(sd_case):
    _, _, ours = sd_case
    pipe = ours["tiny-sd"]
    image = pattern(64, 0)
    cases = {
        "1 control images for 2 ControlNets": dict(control_image=image),
        "unknown ControlNet 'pose'": dict(control_image=image, controlnet="pose"),
        "controlnet and guess_mode need control_image": dict(controlnet="edges"),
        "2 values of controlnet_conditioning_scale for 1 ControlNets": dict(
            control_image=image, controlnet="edges", controlnet_conditioning_scale=[1.0, 2.0]
        ),
        "must satisfy 0 <= start < end <= 1": dict(
            control_image=image, controlnet="edges", control_guidance_start=0.8, control_guidance_end=0.2
        ),
    }
    for expected, kwargs in cases.items():
        with pytest.raises(GenerationError, match=expected) as raised:
            pipe(PROMPT, num_inference_steps=2, **kwargs)
        assert "\n" not in str(raised.value)
