"""End to end: diffusers and `sdruntime.StableDiffusionPipeline` draw the same image: text-to-image and
image-to-image, or inpainting in their place for a U-Net that takes the mask, and one ControlNet picture; SD3
and Flux (the runtime's TransformerPipeline) draw all three, inpainting as their Inpaint pipelines do."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
from sdruntime.manifest import ExportError, Manifest
from sdruntime.pipeline import StableDiffusionPipeline as RuntimePipeline
from sdruntime.session import NonFiniteOutput

from ..errors import SdexportError
from ..families import pipeline_family
from ..specs import controlnet_models, is_sdxl, transformer_family
from .cases import gradient_image, rectangle_mask
from .metrics import json_number, psnr
from .options import ValidateOptions, exported_controlnets
from .report import GenerationResult, Problem
from .schedulers import diffusers_scheduler, quiet_diffusers

MODES = ("text2img", "img2img", "inpaint")
DIFF_AMPLIFY = 16  # the saved difference image, |diffusers - runtime| times this
CONTROLNET_SCALE = 1.0  # given to both pipelines: their defaults differ by mode
REFINER = "an SDXL refiner draws from an image only"
# diffusers' pipeline for (kind of pipeline, mode, with a ControlNet)
REFERENCE_CLASSES = {
    ("sd", "text2img", False): "StableDiffusionPipeline",
    ("sd", "img2img", False): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpaint", False): "StableDiffusionInpaintPipeline",
    ("sd", "text2img", True): "StableDiffusionControlNetPipeline",
    ("sd", "inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "text2img", False): "StableDiffusionXLPipeline",
    ("sdxl", "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint", False): "StableDiffusionXLInpaintPipeline",
    ("sdxl", "text2img", True): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
    ("sd3", "text2img", False): "StableDiffusion3Pipeline",
    ("sd3", "img2img", False): "StableDiffusion3Img2ImgPipeline",
    ("sd3", "inpaint", False): "StableDiffusion3InpaintPipeline",
    ("flux", "text2img", False): "FluxPipeline",
    ("flux", "img2img", False): "FluxImg2ImgPipeline",
    ("flux", "inpaint", False): "FluxInpaintPipeline",
}
# what each kind of pipeline needs to draw anything (SD3 draws without T5, as diffusers' does)
DRAWING_COMPONENTS = {
    "sd": ("text_encoder", "unet", "vae_decoder"),
    "sdxl": ("text_encoder_2", "unet", "vae_decoder"),
    "sd3": ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
    "flux": ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
}


@dataclass(frozen=True)
class Generation:
    """One end-to-end run's settings: the scheduler, its exported config, the size and the PSNR bound."""

    scheduler: str
    config: dict[str, Any]
    size: tuple[int, int]
    min_psnr: float


@dataclass(frozen=True)
class Draw:
    """One end-to-end case: its name in the report, what it draws, the ControlNet it draws with, or why not."""

    name: str
    mode: str  # text2img | img2img | inpaint
    controlnet: str | None = None  # its NAME
    skipped: str | None = None

    def result(self, min_psnr: float, **fields) -> GenerationResult:
        return GenerationResult(self.name, self.mode, min_psnr, controlnet=self.controlnet, **fields)


def pipeline_kind(family: str) -> str:
    """sd3, flux, sdxl, or sd for SD 1.x/2.x: the keys of REFERENCE_CLASSES and DRAWING_COMPONENTS."""
    return family if family in DRAWING_COMPONENTS else "sd"


def planned_draws(manifest: Manifest, controlnet: str | None) -> list[Draw]:
    """text2img and img2img, or inpaint in their place for a U-Net that takes the mask (it draws nothing
    else); SD3 and Flux inpaint too, with their 16-channel transformer; then, for an export with ControlNets,
    one picture with `controlnet` ("controlnet/NAME") in the export's first mode."""
    facts = manifest.pipeline
    refiner = REFINER if facts.family == "sdxl" and not manifest.has("text_encoder") else None
    no_encoder = None if manifest.has("vae_encoder") else "the export has no vae_encoder"
    if facts.transformer_family:
        return [Draw(mode, mode, skipped=no_encoder if mode != "text2img" else None) for mode in MODES]
    if facts.unet_channels != facts.latent_channels:
        why = f"a {facts.unet_channels}-channel U-Net inpaints only: see inpaint"
        first = Draw("inpaint", "inpaint", skipped=no_encoder)
        draws = [Draw("text2img", "text2img", skipped=why), Draw("img2img", "img2img", skipped=why), first]
    else:
        first = Draw("text2img", "text2img", skipped=refiner)
        draws = [first, Draw("img2img", "img2img", skipped=no_encoder)]
    if exported_controlnets(manifest):
        name = controlnet.split("/", 1)[1] if controlnet else None
        why = first.skipped if controlnet else "no --controlnet NAME=PATH given"
        draws.append(Draw("controlnet", first.mode, name, why))
    return draws


def reference_pipeline(pipe, scheduler, draw: Draw):
    """diffusers' pipeline for the draw's mode over the source's components, `scheduler` and its ControlNet."""
    parts = {**pipe.components, "scheduler": scheduler}
    if draw.controlnet:
        parts["controlnet"] = controlnet_models(pipe)[f"controlnet/{draw.controlnet}"]
    if transformer_family(pipe):
        extra = {}
    elif is_sdxl(pipe):  # no watermark, as the runtime adds none
        extra = {"force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt", True)}
        if draw.mode != "text2img":
            extra["requires_aesthetics_score"] = pipe.config.get("requires_aesthetics_score", False)
        elif parts.get("text_encoder") is None:
            raise SdexportError(f"{REFINER}: validate it with img2img")
        extra["add_watermarker"] = False
    else:
        extra = {"requires_safety_checker": False}
    kind = pipeline_kind(pipeline_family(pipe))
    cls = getattr(diffusers, REFERENCE_CLASSES[kind, draw.mode, draw.controlnet is not None])
    with quiet_diffusers():
        reference = cls(**parts, **extra)
    reference.set_progress_bar_config(disable=True)
    return reference


def shifted_decode(reference, latents: torch.Tensor) -> np.ndarray:
    """SD3 inpainting's picture as diffusers' other SD3 pipelines and the runtime decode it: latents / scaling +
    shift (StableDiffusion3InpaintPipeline's own decode leaves the shift out, diffusers issue 13611)."""
    vae = reference.vae
    image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return reference.image_processor.postprocess(image, output_type="np")


def diffusers_generate(pipe, scheduler, draw: Draw, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [H, W, 3], final latents [B, C, h, w]: Flux's unpacked, as the runtime returns them) from
    diffusers' pipeline for the draw."""
    reference = reference_pipeline(pipe, scheduler, draw)
    family = transformer_family(pipe)
    unshifted = family == "sd3" and draw.mode == "inpaint"
    final = {}

    def keep_latents(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad(), quiet_diffusers():  # its notes on its own dtype handling say nothing of the export
        out = reference(
            **kwargs,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent" if unshifted else "np",
            callback_on_step_end=keep_latents,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        images = shifted_decode(reference, out.images) if unshifted else out.images
    image = (images[0] * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    latents = final["latents"]
    if family == "flux":
        latents = FluxPipeline._unpack_latents(latents, kwargs["height"], kwargs["width"], reference.vae_scale_factor)
    return image, latents.float().numpy()


def save_comparison(folder: Path, name: str, reference: np.ndarray, ours: np.ndarray) -> str:
    """diffusers | runtime | |difference| x DIFF_AMPLIFY, side by side in one PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    diff = np.clip(np.abs(reference.astype(np.int16) - ours.astype(np.int16)) * DIFF_AMPLIFY, 0, 255).astype(np.uint8)
    path = folder / f"{name}.png"
    Image.fromarray(np.concatenate([reference, ours, diff], axis=1)).save(path)
    return str(path)


def generation_kwargs(draw: Draw, opts: ValidateOptions, size: tuple[int, int], sized: bool) -> dict[str, Any]:
    """What the runtime is called with: the same prompt, steps and guidance for every draw; the gradient as the
    init image, a rectangle to repaint as the mask and the mirrored gradient as the control image. `sized`:
    image-to-image takes the size too (SD3's and Flux's pipelines do, and Flux's default is not the image's)."""
    kwargs: dict[str, Any] = {
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "num_inference_steps": opts.steps,
        "guidance_scale": opts.guidance_scale,
    }
    if draw.mode == "img2img":
        kwargs.update(image=gradient_image(*size), strength=opts.strength)
        return {**kwargs, "height": size[0], "width": size[1]} if sized else kwargs
    kwargs.update(height=size[0], width=size[1])
    if draw.mode == "inpaint":
        kwargs.update(image=gradient_image(*size), mask_image=rectangle_mask(*size), strength=opts.strength)
    if draw.controlnet:
        control = gradient_image(*size, flip=True)
        kwargs.update(control_image=control, controlnet=draw.controlnet, controlnet_conditioning_scale=CONTROLNET_SCALE)
    return kwargs


def diffusers_kwargs(draw: Draw, ours: dict[str, Any]) -> dict[str, Any]:
    """The runtime's arguments as diffusers' pipeline takes them: its ControlNet is built in, and its
    text-to-image pipeline calls the control image `image`."""
    kwargs = {k: v for k, v in ours.items() if k != "controlnet"}
    if draw.controlnet and draw.mode == "text2img":
        kwargs["image"] = kwargs.pop("control_image")
    return kwargs


def compare_generation(draw: Draw, pipe, runtime, run: Generation, opts: ValidateOptions) -> GenerationResult:
    """One generation by diffusers and by the runtime with the same prompt, seed, steps and scheduler."""
    transformer = transformer_family(pipe) is not None
    kwargs = generation_kwargs(draw, opts, run.size, sized=transformer)
    scheduler = diffusers_scheduler(run.scheduler, run.config)
    image, latents = diffusers_generate(pipe, scheduler, draw, opts.seed, **diffusers_kwargs(draw, kwargs))
    # SD3's and Flux's runtime runs the export's flow-matching scheduler, the only kind that serves them
    chosen = {} if transformer else {"scheduler": run.scheduler}
    try:
        ours = runtime(**kwargs, **chosen, seed=opts.seed)
    except NonFiniteOutput as e:
        return draw.result(run.min_psnr, finite=False, problems=(Problem(draw.name, "non_finite", str(e)),))
    ours_image = np.asarray(ours.images[0])
    psnr_db = psnr(image, ours_image)
    finite = bool(np.isfinite(ours.latents).all())
    problems = []
    if psnr_db < run.min_psnr:
        problems.append(Problem(draw.name, "tolerance", f"PSNR {psnr_db:.1f} dB < {run.min_psnr:g} dB"))
    if not finite:
        problems.append(Problem(draw.name, "non_finite", "NaN/Inf in the final latents"))
    saved = save_comparison(Path(opts.save_images), draw.name, image, ours_image) if opts.save_images else None
    return draw.result(
        run.min_psnr,
        psnr_db=psnr_db,
        latent_max_abs=json_number(np.abs(latents - ours.latents).max()),
        finite=finite,
        image=saved,
        problems=tuple(problems),
    )


def skipped_generations(draws: list[Draw], min_psnr: float, why: str) -> dict[str, GenerationResult]:
    """Every draw, not run, for the same reason."""
    return {draw.name: draw.result(min_psnr, skipped=why) for draw in draws}


def end_to_end(
    pipe, manifest: Manifest, opts: ValidateOptions, run: Generation, draws: list[Draw]
) -> dict[str, GenerationResult]:
    """Each planned draw through sdruntime.StableDiffusionPipeline (a TransformerPipeline for SD3 and Flux) and
    diffusers."""
    needed = DRAWING_COMPONENTS[pipeline_kind(manifest.pipeline.family)]
    missing = [c for c in needed if not manifest.has(c)]
    if missing:
        return skipped_generations(draws, run.min_psnr, f"the export has no {', '.join(missing)}")
    try:
        runtime = RuntimePipeline.load(manifest.folder, provider=opts.provider, verify=False)
    except ExportError as e:
        load = Problem("", "load", f"the runtime cannot load it: {e}")
        return {d.name: d.result(run.min_psnr, problems=(replace(load, part=d.name),)) for d in draws}
    results = {}
    for draw in draws:
        if draw.skipped:
            results[draw.name] = draw.result(run.min_psnr, skipped=draw.skipped)
        else:
            results[draw.name] = compare_generation(draw, pipe, runtime, run, opts)
    return results
