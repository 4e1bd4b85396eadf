"""End to end: diffusers and `sdruntime.StableDiffusionPipeline` draw the same image (text2img and img2img)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from sdruntime.manifest import ExportError, Manifest
from sdruntime.pipeline import StableDiffusionPipeline as RuntimePipeline
from sdruntime.session import NonFiniteOutput

from ..errors import SdexportError
from ..specs import is_sdxl
from .cases import gradient_image
from .metrics import json_number, psnr
from .options import ValidateOptions
from .report import GenerationResult, Problem
from .schedulers import diffusers_scheduler, quiet_diffusers

MODES = ("text2img", "img2img")
DIFF_AMPLIFY = 16  # the saved difference image, |diffusers - runtime| times this


@dataclass(frozen=True)
class Generation:
    """One end-to-end run's settings: the scheduler, its exported config, the size and the PSNR bound."""

    scheduler: str
    config: dict[str, Any]
    size: tuple[int, int]
    min_psnr: float


def reference_pipeline(pipe, scheduler, img2img: bool):
    """diffusers' text-to-image or image-to-image pipeline over the source's components and `scheduler`."""
    parts = {**pipe.components, "scheduler": scheduler}
    if is_sdxl(pipe):  # no watermark, as the runtime adds none
        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        flags = {"force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt", True)}
        if img2img:
            flags["requires_aesthetics_score"] = pipe.config.get("requires_aesthetics_score", False)
        elif parts.get("text_encoder") is None:
            raise SdexportError("an SDXL refiner draws from an image only: validate it with img2img")
        extra = {**flags, "add_watermarker": False}
    else:
        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
        extra = {"requires_safety_checker": False}
    with quiet_diffusers():
        reference = cls(**parts, **extra)
    reference.set_progress_bar_config(disable=True)
    return reference


def diffusers_generate(pipe, scheduler, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [H, W, 3], final latents) from diffusers' text-to-image or image-to-image pipeline."""
    reference = reference_pipeline(pipe, scheduler, "image" in kwargs)
    final = {}

    def keep_latents(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        out = reference(
            **kwargs,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback_on_step_end=keep_latents,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    image = (out.images[0] * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    return image, final["latents"].float().numpy()


def save_comparison(folder: Path, mode: str, reference: np.ndarray, ours: np.ndarray) -> str:
    """diffusers | runtime | |difference| x DIFF_AMPLIFY, side by side in one PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    diff = np.clip(np.abs(reference.astype(np.int16) - ours.astype(np.int16)) * DIFF_AMPLIFY, 0, 255).astype(np.uint8)
    path = folder / f"{mode}.png"
    Image.fromarray(np.concatenate([reference, ours, diff], axis=1)).save(path)
    return str(path)


def generation_kwargs(mode: str, opts: ValidateOptions, size: tuple[int, int]) -> dict[str, Any]:
    """What both pipelines are called with; the same prompt, steps and guidance."""
    kwargs: dict[str, Any] = {
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "num_inference_steps": opts.steps,
        "guidance_scale": opts.guidance_scale,
    }
    if mode == "img2img":
        return {**kwargs, "image": gradient_image(*size), "strength": opts.strength}
    return {**kwargs, "height": size[0], "width": size[1]}


def compare_generation(mode: str, pipe, runtime, run: Generation, opts: ValidateOptions) -> GenerationResult:
    """One generation by diffusers and by the runtime with the same prompt, seed, steps and scheduler."""
    kwargs = generation_kwargs(mode, opts, run.size)
    result = GenerationResult(mode, run.min_psnr)
    image, latents = diffusers_generate(pipe, diffusers_scheduler(run.scheduler, run.config), opts.seed, **kwargs)
    try:
        ours = runtime(**kwargs, scheduler=run.scheduler, seed=opts.seed)
    except NonFiniteOutput as e:
        return replace(result, finite=False, problems=(Problem(mode, "non_finite", str(e)),))
    ours_image = np.asarray(ours.images[0])
    psnr_db = psnr(image, ours_image)
    finite = bool(np.isfinite(ours.latents).all())
    problems = []
    if psnr_db < run.min_psnr:
        problems.append(Problem(mode, "tolerance", f"PSNR {psnr_db:.1f} dB < {run.min_psnr:g} dB"))
    if not finite:
        problems.append(Problem(mode, "non_finite", "NaN/Inf in the final latents"))
    saved = save_comparison(Path(opts.save_images), mode, image, ours_image) if opts.save_images else None
    return replace(
        result,
        psnr_db=psnr_db,
        latent_max_abs=json_number(np.abs(latents - ours.latents).max()),
        finite=finite,
        image=saved,
        problems=tuple(problems),
    )


def skipped_generations(min_psnr: float, why: str) -> dict[str, GenerationResult]:
    """Both modes, not run, for the same reason."""
    return {mode: GenerationResult(mode, min_psnr, skipped=why) for mode in MODES}


def end_to_end(pipe, manifest: Manifest, opts: ValidateOptions, run: Generation) -> dict[str, GenerationResult]:
    """Text-to-image and image-to-image through sdruntime.StableDiffusionPipeline and diffusers."""
    encoder = "text_encoder_2" if manifest.pipeline.family == "sdxl" else "text_encoder"
    missing = [c for c in (encoder, "unet", "vae_decoder") if not manifest.has(c)]
    if missing:
        return skipped_generations(run.min_psnr, f"the export has no {', '.join(missing)}")
    try:
        runtime = RuntimePipeline.load(manifest.folder, provider=opts.provider, verify=False)
    except ExportError as e:
        why = f"the runtime cannot load it: {e}"
        return {m: GenerationResult(m, run.min_psnr, problems=(Problem(m, "load", why),)) for m in MODES}
    if manifest.pipeline.family == "sdxl" and not manifest.has("text_encoder"):
        text2img = GenerationResult("text2img", run.min_psnr, skipped="an SDXL refiner draws from an image only")
    else:
        text2img = compare_generation("text2img", pipe, runtime, run, opts)
    if manifest.has("vae_encoder"):
        img2img = compare_generation("img2img", pipe, runtime, run, opts)
    else:
        img2img = GenerationResult("img2img", run.min_psnr, skipped="the export has no vae_encoder")
    return {"text2img": text2img, "img2img": img2img}
