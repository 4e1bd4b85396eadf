"""A `GenerationRequest` resolved once against an SD3 or Flux export into a `TransformerPlan` (plan.py's role for
the U-Net families): the prompts each text encoder reads, the size, seeds, guidance, T5's token count and the
flow-matching schedule, with diffusers' defaults for each pipeline (StableDiffusion3(Img2Img|Inpaint)Pipeline,
Flux(Img2Img|Inpaint)Pipeline).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .conditioning import MicroConditioning
from .decoders import decoder_component
from .guidance import ClassifierFreeGuidance, Guidance, NoGuidance, choose_guidance
from .image import init_image_hash, parameters_text
from .manifest import Manifest, axis_sizes, latent_shape
from .plan import IMAGE_TO_IMAGE, INPAINT, TEXT_TO_IMAGE, Seeds, SizeRule
from .request import GenerationError, GenerationRequest
from .schedulers import FlowMatchEulerDiscreteScheduler, Scheduler, flow_img2img_begin_index, image_mu, make_scheduler
from .schedulers import scheduler_class as find_scheduler_class

# Which text encoder reads which prompt (and its negative): SD3's CLIP-L, CLIP-G and T5; Flux's CLIP-L and T5
PROMPT_FIELDS = {
    "sd3": {"text_encoder": "", "text_encoder_2": "_2", "text_encoder_3": "_3"},
    "flux": {"text_encoder": "", "text_encoder_2": "_2"},
}
T5_ENCODER = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
T5_LONGEST = 512  # diffusers refuses a longer max_sequence_length whatever the tokenizer says


@dataclass(frozen=True)
class TransformerDefaults:
    """What a family's diffusers pipelines default to where a request leaves the choice open."""

    guidance_scale: float  # the text-to-image pipeline's
    image_guidance_scale: float  # the image-to-image and inpainting pipelines'
    strength: float = 0.6  # both of those
    steps: int = 28  # num_inference_steps, in all six pipelines


# SD3's three pipelines all default to 7.0; FluxPipeline to 3.5 and FluxImg2Img/FluxInpaint to 7.0
TRANSFORMER_DEFAULTS = {"sd3": TransformerDefaults(7.0, 7.0), "flux": TransformerDefaults(3.5, 7.0)}


@dataclass(frozen=True, eq=False)
class TransformerPlan:
    """A request with every choice made, read by each stage of TransformerPipeline."""

    request: GenerationRequest
    family: str
    prompts: dict[str, list[str]]  # per text encoder, one per prompt
    negative_prompts: dict[str, list[str]] | None  # per text encoder; None when the guidance takes no negative half
    height: int
    width: int
    seeds: Seeds
    scheduler: Scheduler  # built for the run, entered part-way for image-to-image and inpainting
    guidance: Guidance  # SD3's classifier-free guidance, or Flux's true CFG (true_cfg_scale)
    guidance_scale: float  # SD3: the CFG scale; Flux dev: the embedded (distilled) guidance
    strength: float
    max_sequence_length: int
    latent_shape: tuple[int, int, int, int]  # [images, channels, h, w], unpacked
    custom_sigmas: bool
    mode: str = TEXT_TO_IMAGE

    @property
    def batch(self) -> int:
        return len(self.prompts["text_encoder"]) * self.request.num_images

    @property
    def image_to_image(self) -> bool:
        return self.mode != TEXT_TO_IMAGE

    @property
    def inpaint(self) -> bool:
        return self.mode == INPAINT

    def parameters(self, model_hash: str, model_name: str, embedded_guidance: bool) -> list[str]:
        """Each image's parameters text, as plan.Plan writes it; Flux dev's embedded guidance is Forge's
        "Distilled CFG Scale", its true CFG scale the "CFG scale"."""
        request, flux = self.request, self.family == "flux"
        settings = {
            "Steps": len(self.scheduler.timesteps),
            "Sampler": FlowMatchEulerDiscreteScheduler.NAME,
            "CFG scale": f"{self.guidance.scale:g}",
            "Distilled CFG Scale": f"{self.guidance_scale:g}" if flux and embedded_guidance else None,
            "Size": f"{self.width}x{self.height}",
            "Model hash": model_hash,
            "Model": model_name,
            "Denoising strength": f"{self.strength:g}" if self.image_to_image else None,
            "Init image hash": init_image_hash(request.image) if self.image_to_image else None,
            "Mask hash": init_image_hash(request.mask_image) if self.inpaint else None,
            "Clip skip": request.clip_skip or None,
            "Max sequence length": self.max_sequence_length,
            "Sigmas": " ".join(f"{s:g}" for s in request.sigmas) if self.custom_sigmas else None,
            "Scheduler options": _options_text(request.scheduler_options),
            "Latents": "given" if request.latents is not None else None,
        }
        negatives = (self.negative_prompts or {}).get("text_encoder") or [""] * len(self.prompts["text_encoder"])
        texts = []
        for i in range(self.batch):
            prompt = i // request.num_images
            given = _other_prompts(request, prompt)
            fields = {**settings, "Seed": self.seeds.seed_of(i), **given, **self.seeds.batch_fields(i, self.batch)}
            texts.append(parameters_text(self.prompts["text_encoder"][prompt], negatives[prompt], fields))
        return texts


def _other_prompts(request: GenerationRequest, prompt: int) -> dict[str, str]:
    """The other text encoders' prompts and negative prompts the request set, for its `prompt`-th prompt
    (one of a list, or the one given for all)."""
    given = {}
    for field, label in (("prompt", "Prompt"), ("negative_prompt", "Negative prompt")):
        for n in (2, 3):
            value = getattr(request, f"{field}_{n}", None)
            if value is not None:
                given[f"{label} {n}"] = value if isinstance(value, str) else list(value)[prompt]
    return given


def _options_text(options: Mapping[str, object] | None) -> str | None:
    """Scheduler options as KEY=VALUE pairs, values in JSON but bare strings (plan.py writes them so)."""
    items = (f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (options or {}).items())
    return "; ".join(items) or None


def resolve_transformer_plan(
    request: GenerationRequest, manifest: Manifest, scheduler_config: Mapping[str, Any]
) -> TransformerPlan:
    """Check a request against an SD3 or Flux export and make every choice it leaves open; GenerationError names
    the first thing to change."""
    facts = manifest.pipeline
    family = facts.family
    _refuse_unet_fields(request, family)
    decoder_component(request.decoder, facts)  # refuses "tiny": no tiny decoder reads 16-channel latents here
    _check_counts(request)
    prompts = _prompt_lists(request, family)
    negatives = _negative_lists(request, family, len(prompts["text_encoder"]))
    mode = _mode(request)
    defaults = TRANSFORMER_DEFAULTS[family]
    strength = defaults.strength if request.strength is None else _number("strength", request.strength)
    if request.image is not None and not 0.0 < strength <= 1.0:
        raise GenerationError(f"strength must be in (0, 1], got {strength}")
    sizes = SizeRule.of(manifest)
    # diffusers' SD3 and Flux pipelines draw their default size, never the init image's
    height = sizes.default[0] if request.height is None else request.height
    width = sizes.default[1] if request.width is None else request.width
    sizes.check(height, width)
    default_scale = defaults.guidance_scale if mode == TEXT_TO_IMAGE else defaults.image_guidance_scale
    scale = default_scale if request.guidance_scale is None else _number("guidance_scale", request.guidance_scale)
    guidance = _guidance(request, family, scale)
    batch = len(prompts["text_encoder"]) * request.num_images
    shape = latent_shape(facts, batch, height, width)
    if request.latents is not None and tuple(np.shape(request.latents)) != shape:
        raise GenerationError(f"latents must have shape {shape}, got {tuple(np.shape(request.latents))}")
    tokens = axis_sizes(facts, "transformer", 1, height, width)["packed_sequence"]
    return TransformerPlan(
        request=request,
        family=family,
        prompts=prompts,
        negative_prompts=negatives if guidance.doubles_batch else None,
        height=height,
        width=width,
        seeds=Seeds.for_request(request.seed, batch),
        scheduler=_scheduler(request, family, scheduler_config, tokens, strength),
        guidance=guidance,
        guidance_scale=scale,
        strength=strength,
        max_sequence_length=_max_sequence_length(request, manifest),
        latent_shape=shape,
        custom_sigmas=request.sigmas is not None,
        mode=mode,
    )


def _refuse_unet_fields(request: GenerationRequest, family: str) -> None:
    """What only the U-Net families take, or only the other transformer family, in one line each."""
    unet_only = {
        "eta": bool(request.eta),
        "prompt_embeds": request.prompt_embeds is not None,
        "timestep_spacing": request.timestep_spacing is not None,
        "sizes, crops and aesthetic scores (SDXL's micro-conditioning)": request.micro != MicroConditioning(),
        "ControlNets (control_image, controlnet, guess_mode, ...)": request.control_image is not None
        or request.controlnet is not None
        or request.controlnet_conditioning_scale is not None
        or request.guess_mode
        or request.control_guidance_start != 0.0
        or request.control_guidance_end != 1.0,
        "LoRAs (loras)": bool(request.loras),
        "weighted prompts (prompt_syntax, downweight)": request.prompt_syntax is not None
        or request.downweight is not None,
        "textual-inversion embeddings (embeddings)": bool(request.embeddings),
    }
    other_family = {
        "sd3": {"true_cfg_scale": request.true_cfg_scale is not None},
        "flux": {
            "clip_skip": request.clip_skip is not None,
            "prompt_3 and negative_prompt_3 (SD3's T5 prompts; Flux's T5 reads prompt_2)": request.prompt_3 is not None
            or request.negative_prompt_3 is not None,
        },
    }[family]
    for what, given in {**unet_only, **other_family}.items():
        if given:
            raise GenerationError(f"this {family} export does not take {what}: leave it out")
    if request.scheduler is not None:
        find_scheduler_class(request.scheduler, flow_matching=True)  # refuses the others in one line


def _check_counts(request: GenerationRequest) -> None:
    steps = request.num_inference_steps
    if request.sigmas is None and steps is not None and (not isinstance(steps, int) or steps < 1):
        raise GenerationError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if request.num_images < 1:
        raise GenerationError(f"num_images must be at least 1, got {request.num_images}")


def _number(name: str, value: object) -> float:
    """A finite number: NaN would slip past every range check."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise GenerationError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value}: give one, or leave it out for the default")
    return float(value)


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value or not all(isinstance(v, str) for v in value):
        raise GenerationError(f"{what} must be a string or a non-empty list of strings")
    return list(value)


def _matched(value: str | Sequence[str], what: str, count: int) -> list[str]:
    """One string per prompt: a single one stands for all of them."""
    values = _as_list(value, what)
    if len(values) == 1 and count > 1:
        values = values * count
    if len(values) != count:
        raise GenerationError(f"{len(values)} {what}s for {count} prompts: give one or as many")
    return values


def _prompt_lists(request: GenerationRequest, family: str) -> dict[str, list[str]]:
    """Each text encoder's prompts: prompt_2 and prompt_3 fall back to prompt, as `prompt_2 or prompt` does."""
    if request.prompt is None:
        raise GenerationError("give a prompt: SD3 and Flux exports do not take prompt_embeds")
    prompts = _as_list(request.prompt, "prompt")
    lists = {}
    for encoder, suffix in PROMPT_FIELDS[family].items():
        own = getattr(request, f"prompt{suffix}") if suffix else None
        lists[encoder] = _matched(own, f"prompt{suffix}", len(prompts)) if own else prompts
    return lists


def _negative_lists(request: GenerationRequest, family: str, count: int) -> dict[str, list[str]]:
    """Each text encoder's negative prompts: "" by default, negative_prompt_2 and _3 falling back to
    negative_prompt (encode_prompt's `negative_prompt_2 or negative_prompt`)."""
    first = _matched(request.negative_prompt or "", "negative_prompt", count)
    lists = {}
    for encoder, suffix in PROMPT_FIELDS[family].items():
        own = getattr(request, f"negative_prompt{suffix}") if suffix else None
        lists[encoder] = _matched(own, f"negative_prompt{suffix}", count) if own else first
    return lists


def _mode(request: GenerationRequest) -> str:
    if request.mask_image is not None and request.image is None:
        raise GenerationError("mask_image needs the image to inpaint: pass image too")
    if request.latents is not None and request.image is not None:
        raise GenerationError("latents start a text-to-image run: leave out either latents or image")
    if request.mask_image is not None:
        return INPAINT
    return TEXT_TO_IMAGE if request.image is None else IMAGE_TO_IMAGE


def _guidance(request: GenerationRequest, family: str, scale: float) -> Guidance:
    """SD3: classifier-free guidance above 1. Flux: the guidance scale is embedded (dev) or unused (schnell);
    true CFG runs the negative prompt as a second batch when true_cfg_scale > 1 and a negative prompt is given."""
    if family == "sd3":
        return choose_guidance(scale, None, bool(request.negative_prompt))
    true_scale = 1.0 if request.true_cfg_scale is None else _number("true_cfg_scale", request.true_cfg_scale)
    if true_scale > 1.0 and request.negative_prompt is None:
        warnings.warn(
            f"true_cfg_scale {true_scale:g} needs a negative prompt, as in diffusers: pass negative_prompt "
            '(even "") to guide',
            stacklevel=5,
        )
    if true_scale > 1.0 and request.negative_prompt is not None:
        return ClassifierFreeGuidance(true_scale)
    return NoGuidance(true_scale)


def _max_sequence_length(request: GenerationRequest, manifest: Manifest) -> int:
    facts = manifest.pipeline
    longest = min(int(facts.t5_max_length or T5_LONGEST), T5_LONGEST)
    length = facts.max_sequence_length if request.max_sequence_length is None else request.max_sequence_length
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= longest:
        raise GenerationError(
            f"max_sequence_length must be an integer from 1 to {longest} (T5's limit), got {length!r}"
        )
    return int(length)


def _scheduler(
    request: GenerationRequest, family: str, config: Mapping[str, Any], tokens: int, strength: float
) -> Scheduler:
    """FlowMatchEulerDiscreteScheduler as the pipelines set it: Flux passes sigmas linspace(1, 1/n, n) and mu from
    the image's tokens always (the scheduler reads mu only with dynamic shifting), SD3 mu with dynamic shifting
    only (the same number); custom sigmas set the step count. Image-to-image enters at the flow pipelines' index."""
    options = dict(request.scheduler_options or {})
    sigmas = None if request.sigmas is None else [_number("sigmas", s) for s in request.sigmas]
    if sigmas is not None and not sigmas:
        raise GenerationError("sigmas must hold one sigma per step: give at least one")
    default_steps = TRANSFORMER_DEFAULTS[family].steps  # 0 steps were refused by _check_counts
    steps = len(sigmas) if sigmas is not None else request.num_inference_steps or default_steps
    if sigmas is None and family == "flux":
        sigmas = np.linspace(1.0, 1 / steps, steps)
    merged = {**config, **options}
    mu = image_mu(merged, tokens)
    name = request.scheduler or FlowMatchEulerDiscreteScheduler.NAME
    scheduler = make_scheduler(name, config, steps, options, sigmas=sigmas, mu=mu)
    if request.image is None:
        return scheduler
    begin = flow_img2img_begin_index(steps, strength)
    if begin >= len(scheduler.timesteps):
        raise GenerationError(f"strength {strength} with {steps} steps leaves no step to run: raise either")
    return scheduler.starting_at(begin)
