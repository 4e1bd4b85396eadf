"""A `GenerationRequest` resolved against an export, once, into a `Plan` that the pipeline's stages only read.

Every rule that turns what was asked into what runs lives here, each in one place: the family's defaults
(`family_defaults`), which sizes an export draws (`SizeRule`), the seeds that draw each image (`Seeds`,
`batch_seeds`), the scheduler built for the run (entered part-way for image-to-image), the guidance mode
(guidance.py), and the parameters text that reproduces each image.
"""

from __future__ import annotations

import json
import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .adapters import AdapterSet
from .conditioning import MicroConditioning
from .control import ControlPlan, exported_controlnets, resolve_control
from .decoders import FULL_DECODER, TINY_DECODER, decoder_component
from .errors import InvalidArgument
from .guidance import Guidance, choose_guidance
from .image import init_image_hash, init_image_size, parameters_text
from .manifest import Manifest, PipelineFacts, latent_shape
from .noise import TorchGenerator, make_generator
from .prompt_syntax import SYNTAXES, parse_prompt
from .prompt_weighting import DEFAULT_DOWNWEIGHT, DOWNWEIGHT_MODES, MASK_REFUSAL, downweighted
from .request import GenerationError, GenerationRequest
from .schedulers import TIMESTEP_SPACINGS, Scheduler, exported_scheduler_name, img2img_begin_index, make_scheduler
from .textual_inversion import Embeddings

TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT = "text-to-image", "image-to-image", "inpaint"
SEED_LIMIT = 2**32  # torch's CPU generator takes seeds below 2**32 (noise.py)
# What only SD3 and Flux exports take (transformer_plan.py): refused here rather than ignored
TRANSFORMER_FIELDS = (
    "prompt_2",
    "prompt_3",
    "negative_prompt_2",
    "negative_prompt_3",
    "max_sequence_length",
    "sigmas",
    "true_cfg_scale",
)


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family's diffusers pipelines default to where a request leaves the choice open."""

    guidance_scale: float
    strength: float  # image-to-image
    steps: int = 25  # num_inference_steps
    inpaint_strength: float = 1.0  # StableDiffusionInpaintPipeline's
    inpaint_guidance_scale: float = 7.5  # both inpainting pipelines'
    controlnet_scale: float = 1.0  # controlnet_conditioning_scale (with_control)

    def with_control(self, mode: str, xl: bool) -> FamilyDefaults:
        """The defaults of diffusers' ControlNet pipelines for `mode`, where they differ from the plain ones':
        the conditioning scale (0.8 for image-to-image, 0.5 for SD inpainting), SDXL's image-to-image strength
        (0.8) and SDXL's inpainting guidance (5.0)."""
        if mode == IMAGE_TO_IMAGE:
            return replace(self, strength=0.8, controlnet_scale=0.8)
        if mode == INPAINT and xl:
            return replace(self, guidance_scale=5.0, controlnet_scale=1.0)
        return replace(self, controlnet_scale=0.5 if mode == INPAINT else 1.0)

    def for_mode(self, mode: str) -> FamilyDefaults:
        """The defaults of the pipeline that draws `mode`: inpainting has its own guidance scale and strength."""
        if mode != INPAINT:
            return self
        return replace(self, guidance_scale=self.inpaint_guidance_scale, strength=self.inpaint_strength)


SD_DEFAULTS = FamilyDefaults(guidance_scale=7.5, strength=0.8)  # StableDiffusion(Img2Img|Inpaint)Pipeline
# StableDiffusionXL(Img2Img|Inpaint)Pipeline: the inpainting one starts just short of pure noise, from the image
FAMILY_DEFAULTS = {"sdxl": FamilyDefaults(guidance_scale=5.0, strength=0.3, inpaint_strength=0.9999)}


def family_defaults(family: str) -> FamilyDefaults:
    return FAMILY_DEFAULTS.get(family, SD_DEFAULTS)


# -- sizes ------------------------------------------------------------------------------------------


class SizeError(GenerationError):
    """A size the export cannot draw; `static` is its one size (height, width) when that is why."""

    def __init__(self, message: str, static: tuple[int, int] | None = None):
        super().__init__(message)
        self.static = static


@dataclass(frozen=True)
class SizeRule:
    """Which sizes an export draws: positive multiples of its size multiple (tracing fixes the U-Net's
    upsample sizes), or its static size alone."""

    multiple: int
    static: tuple[int, int] | None  # (height, width) of a static export
    default: tuple[int, int]  # (height, width)

    @classmethod
    def of(cls, manifest: Manifest) -> SizeRule:
        facts, static = manifest.pipeline, manifest.static
        fixed = (static.height, static.width) if static else None
        return cls(manifest.size_multiple, fixed, fixed or (facts.default_height, facts.default_width))

    def check(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % self.multiple:
                raise SizeError(
                    f"{name} {value} is not a positive multiple of {self.multiple}, this export's size multiple"
                )
        if self.static and (height, width) != self.static:
            raise SizeError(
                f"this export is static at {self.static[0]}x{self.static[1]}: ask for that size or re-export",
                self.static,
            )

    def round_down(self, height: int, width: int) -> tuple[int, int]:
        """A size rounded down to the size multiple (diffusers rounds an init image's to the VAE factor)."""
        m = self.multiple
        return max(m, height // m * m), max(m, width // m * m)


# -- seeds ------------------------------------------------------------------------------------------


def batch_seeds(count: int, start: int | None = None) -> list[int]:
    """One seed per image, start, start + 1, ... as A1111 numbers a batch, so that each image's recorded
    seed draws it again alone; a random start when none is given."""
    if start is None:
        start = secrets.randbelow(SEED_LIMIT - count + 1)
    elif start + count > SEED_LIMIT:
        raise InvalidArgument(f"seed {start} with {count} images runs past 2**32 - 1: choose a smaller seed")
    return list(range(start, start + count))


@dataclass(frozen=True)
class Seeds:
    """The seeds that draw a request's images: one per image, each drawing its image alone from its own
    generator; or one seed whose generator draws the whole batch, as one torch generator does in diffusers."""

    values: tuple[int, ...]
    per_image: bool

    @classmethod
    def for_request(cls, seed: int | Sequence[int] | None, images: int) -> Seeds:
        if isinstance(seed, (list, tuple)):
            if len(seed) != images:
                raise GenerationError(f"{len(seed)} seeds for {images} images: give one seed or one per image")
            return cls(tuple(int(s) for s in seed), per_image=True)
        if seed is None:
            return cls(tuple(batch_seeds(images)), per_image=images > 1)
        return cls((int(seed),), per_image=False)

    def generator(self) -> TorchGenerator | list[TorchGenerator]:
        """A fresh generator (or one per image) for a run."""
        return make_generator(list(self.values) if self.per_image else self.values[0])

    def seed_of(self, i: int) -> int:
        """The seed recorded for image i."""
        return self.values[i] if self.per_image else self.values[0]

    def batch_fields(self, i: int, images: int) -> dict[str, int]:
        """A shared generator's seed brings image i back only with the whole batch: its size and i's place."""
        return {} if self.per_image or images == 1 else {"Batch size": images, "Batch pos": i}


# -- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportFacts:
    """What resolving a request reads from an export."""

    pipeline: PipelineFacts
    sizes: SizeRule
    scheduler_config: Mapping[str, Any]
    controlnets: Mapping[str, bool] = field(default_factory=dict)  # name -> global_pool_conditions

    @classmethod
    def of(cls, manifest: Manifest, scheduler_config: Mapping[str, Any]) -> ExportFacts:
        return cls(manifest.pipeline, SizeRule.of(manifest), scheduler_config, exported_controlnets(manifest))

    @property
    def xl(self) -> bool:
        return self.pipeline.family == "sdxl"

    @property
    def unet_takes_mask(self) -> bool:
        """A 9-channel inpainting U-Net: more input channels than latent channels."""
        return self.pipeline.unet_channels != self.pipeline.latent_channels

    @property
    def default_scheduler(self) -> str:
        return exported_scheduler_name(self.scheduler_config, self.pipeline.scheduler_class)


@dataclass(frozen=True, eq=False)
class Plan:
    """A request with every choice made: what each stage (encode, prepare latents, denoise, decode, record)
    reads, so none decides anything again."""

    request: GenerationRequest
    prompts: list[str]
    negative_prompts: list[str] | None  # those encoded: None when the guidance takes no unconditional half
    zero_negative: bool  # SDXL without a negative prompt: zeros stand for the unconditional embeddings
    height: int
    width: int
    seeds: Seeds
    steps: int  # num_inference_steps: as asked, else the family's
    scheduler_name: str
    scheduler: Scheduler  # built for the run, entered at image-to-image's first step
    guidance: Guidance
    strength: float
    eta: float | None  # DDIM's, None for the schedulers that take none
    latent_shape: tuple[int, int, int, int]
    mode: str = TEXT_TO_IMAGE  # TEXT_TO_IMAGE, IMAGE_TO_IMAGE or INPAINT
    unet_takes_mask: bool = False  # inpainting on a 9-channel U-Net: the mask and masked image are its input
    control: ControlPlan | None = None  # the ControlNets that run beside the U-Net
    decoder: str = FULL_DECODER  # the component that decodes the final latents (decoders.decoder_component)
    adapters: AdapterSet = AdapterSet()  # the LoRAs the U-Net and text encoders draw with (adapters.py)

    @property
    def batch(self) -> int:
        """Images drawn: each prompt num_images times."""
        return len(self.prompts) * self.request.num_images

    @property
    def image_to_image(self) -> bool:
        """Drawn from an init image: image-to-image, or inpainting."""
        return self.mode != TEXT_TO_IMAGE

    @property
    def inpaint(self) -> bool:
        return self.mode == INPAINT

    def parameters(self, model_hash: str, model_name: str) -> list[str]:
        """Each image's parameters text: A1111's fields first, in its order; then what only this runtime sets."""
        request = self.request
        method = {
            "Steps": self.steps,
            "Sampler": self.scheduler_name,
            "Timestep spacing": self.scheduler.config.get("timestep_spacing"),
            "CFG scale": f"{self.guidance.scale:g}",
        }
        settings = {
            "Size": f"{self.width}x{self.height}",
            "Model hash": model_hash,
            "Model": model_name,
            "Denoising strength": f"{self.strength:g}" if self.image_to_image else None,
            "Init image hash": init_image_hash(request.image) if self.image_to_image else None,
            "Mask hash": init_image_hash(request.mask_image) if self.inpaint else None,
            "Clip skip": request.clip_skip or None,
            "Eta": f"{self.eta:g}" if self.eta is not None else None,
            "Scheduler options": _options_text(request.scheduler_options),
            "Latents": "given" if request.latents is not None and not self.image_to_image else None,
            "Prompt embeds": "given" if request.prompt_embeds is not None else None,
            "Prompt syntax": request.prompt_syntax,
            "Downweight": "remove" if request.prompt_syntax and request.downweight == "remove" else None,
            "Decoder": "tiny" if self.decoder == TINY_DECODER else None,
            **_control_fields(self.control),
            "Lora hashes": ", ".join(f"{lora.name}: {lora.short_hash}" for lora in self.adapters.loras) or None,
            "TI hashes": ", ".join(s.hashes() for s in self.adapters.sources if isinstance(s, Embeddings)) or None,
        }
        negatives = self.negative_prompts or [""] * len(self.prompts)
        texts = []
        for i in range(self.batch):
            fields = {**method, "Seed": self.seeds.seed_of(i), **settings, **self.seeds.batch_fields(i, self.batch)}
            prompt = i // request.num_images
            texts.append(parameters_text(self.prompts[prompt] + _lora_tags(self.adapters), negatives[prompt], fields))
        return texts


def _lora_tags(adapters: AdapterSet) -> str:
    """The LoRAs as A1111 writes them in the prompt, " <lora:NAME:SCALE>" each (A1111 reads them back from there)."""
    return "".join(f" <lora:{lora.name}:{_exact(lora.scale)}>" for lora in adapters.loras)


def _control_fields(control: ControlPlan | None) -> dict[str, str | None]:
    """Each ControlNet as A1111's ControlNet extension records a unit ("ControlNet 0": its name as Model, its scale
    as Weight, its span of the steps), with its control image's hash; `generate --control MODEL=IMAGE:WEIGHT
    --control-start --control-end [--guess-mode]` draws it again."""
    if control is None:
        return {}
    fields: dict[str, str | None] = {
        f"ControlNet {i}": (
            f"Model: {unit.name}, Weight: {_exact(unit.scale)}, Guidance Start: {_exact(unit.start)}, "
            f"Guidance End: {_exact(unit.end)}, Image hash: {init_image_hash(unit.image)}"
        )
        for i, unit in enumerate(control.units)
    }
    fields["Guess mode"] = "True" if control.guess_mode else None
    return fields


def _exact(value: float) -> str:
    """A number as %g writes it when that reads back as the same float, else in full: a rerun gets the same value."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def _options_text(options: Mapping[str, object] | None) -> str | None:
    """Scheduler options as `--scheduler-option` takes them back: KEY=VALUE, values in JSON but bare strings."""
    items = (
        f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in (options or {}).items()
    )
    return "; ".join(items) or None


def resolve_plan(request: GenerationRequest, export: ExportFacts) -> Plan:
    """Check a request against an export and make every choice it leaves open; GenerationError (or another
    InvalidArgument) names the first thing to change."""
    prompts, negatives = _prompts(request)
    _check_request(request, export)
    _check_prompt_syntax(request, [*prompts, *(negatives or [])], export)
    _check_finite(request)
    mode = _mode(request, export)
    defaults = family_defaults(export.pipeline.family).for_mode(mode)
    steps = defaults.steps if request.num_inference_steps is None else request.num_inference_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise GenerationError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if request.control_image is not None:
        defaults = defaults.with_control(mode, export.xl)
    control = resolve_control(request, export.controlnets, defaults.controlnet_scale)
    strength = defaults.strength if request.strength is None else request.strength
    if request.image is not None and not 0.0 < strength <= 1.0:
        raise GenerationError(f"strength must be in (0, 1], got {strength}")
    height, width = _size(request, export.sizes)
    batch = len(prompts) * request.num_images
    seeds = Seeds.for_request(request.seed, batch)
    guidance_scale = defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale
    guidance = choose_guidance(guidance_scale, export.pipeline.time_cond_proj_dim, bool(request.negative_prompt))
    name, scheduler, eta = _scheduler(request, export, steps, strength)
    shape = latent_shape(export.pipeline, batch, height, width)
    if request.latents is not None and request.image is None and tuple(request.latents.shape) != shape:
        raise GenerationError(f"latents must have shape {shape}, got {tuple(request.latents.shape)}")
    return Plan(
        request=request,
        prompts=prompts,
        negative_prompts=guidance.negative_prompts(negatives, len(prompts)),
        zero_negative=bool(export.xl and negatives is None and export.pipeline.force_zeros_for_empty_prompt),
        height=height,
        width=width,
        seeds=seeds,
        steps=steps,
        scheduler_name=name,
        scheduler=scheduler,
        guidance=guidance,
        strength=strength,
        eta=eta,
        latent_shape=shape,
        mode=mode,
        unet_takes_mask=mode == INPAINT and export.unet_takes_mask,
        control=control,
        decoder=decoder_component(request.decoder, export.pipeline),
        adapters=AdapterSet.of(request.loras, Embeddings.sources(request.embeddings)),
    )


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value or not all(isinstance(v, str) for v in value):
        raise GenerationError(f"{what} must be a string or a non-empty list of strings")
    return list(value)


def _prompts(request: GenerationRequest) -> tuple[list[str], list[str] | None]:
    """(prompts, negative prompts as given: one per prompt, or None)."""
    embeds = request.prompt_embeds
    if request.prompt is None and embeds is None:
        raise GenerationError("give a prompt, or prompt_embeds")
    prompts = [""] * len(embeds) if request.prompt is None else _as_list(request.prompt, "prompt")
    if embeds is not None and len(embeds) != len(prompts):
        raise GenerationError(f"{len(embeds)} prompt embeddings for {len(prompts)} prompts: give one per prompt")
    if request.negative_prompt is None:
        return prompts, None
    negatives = _as_list(request.negative_prompt, "negative_prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise GenerationError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one or as many")
    return prompts, negatives


def _check_request(request: GenerationRequest, export: ExportFacts) -> None:
    """The counts, and what only one family takes."""
    if request.num_images < 1:
        raise GenerationError(f"num_images must be at least 1, got {request.num_images}")
    if not export.xl and request.micro != MicroConditioning():
        raise GenerationError("sizes, crops and aesthetic scores condition SDXL exports only; this one is not SDXL")
    if export.xl and request.prompt_embeds is not None:
        raise GenerationError(
            "prompt_embeds needs pooled embeddings too on SDXL, which this pipeline does not take: pass prompts"
        )
    for name in TRANSFORMER_FIELDS:
        if getattr(request, name) is not None:
            raise GenerationError(
                f"{name} applies to SD3 and Flux exports; this {export.pipeline.family} export does not take it: "
                "leave it out"
            )


def _check_prompt_syntax(request: GenerationRequest, texts: list[str], export: ExportFacts) -> None:
    """prompt_syntax: a known one, prompts it reads (each parsed here, so that a mistake stops the request before
    anything runs), and nothing it cannot go with."""
    syntax, downweight = request.prompt_syntax, request.downweight or DEFAULT_DOWNWEIGHT
    if downweight not in DOWNWEIGHT_MODES:
        raise GenerationError(f"unknown downweight '{downweight}': choose {' or '.join(DOWNWEIGHT_MODES)}")
    if syntax is None:
        if request.downweight is not None:
            raise GenerationError("downweight applies to weighted prompts: give prompt_syntax too, or leave it out")
        return
    if syntax not in SYNTAXES:
        raise GenerationError(f"unknown prompt_syntax '{syntax}': choose one of {', '.join(SYNTAXES)}")
    if request.prompt_embeds is not None:
        raise GenerationError("prompt_syntax reads the prompts and prompt_embeds replaces them: give one or the other")
    if export.xl and request.clip_skip:
        raise GenerationError("clip_skip with prompt_syntax is not supported on SDXL exports: leave one of them out")
    parsed = [parse_prompt(text, syntax) for text in texts]
    masks = bool(export.pipeline.text_encoder_attention_mask)
    if downweight == "mask" and not masks and any(downweighted(p) for p in parsed):
        raise GenerationError(MASK_REFUSAL)


def _mode(request: GenerationRequest, export: ExportFacts) -> str:
    """Text-to-image, image-to-image or inpainting, from what was asked and what the U-Net takes."""
    if request.mask_image is None:
        if export.unet_takes_mask:
            raise GenerationError(
                f"this export's U-Net inpaints ({export.pipeline.unet_channels} input channels): pass image and mask_image"
            )
        return TEXT_TO_IMAGE if request.image is None else IMAGE_TO_IMAGE
    if request.image is None:
        raise GenerationError("mask_image needs the image to inpaint: pass image too")
    if not isinstance(request.image, np.ndarray) and not isinstance(request.mask_image, np.ndarray):
        image, mask = init_image_size(request.image), init_image_size(request.mask_image)
        if image != mask:
            raise GenerationError(
                f"mask_image is {mask[1]}x{mask[0]}, the image {image[1]}x{image[0]}: give a mask of the image's size"
            )
    return INPAINT


def _check_finite(request: GenerationRequest) -> None:
    """The scales are numbers: NaN fails every comparison, so it would slip past the range checks and the
    guidance mode's choice and draw noise."""
    scales = {"guidance_scale": request.guidance_scale, "strength": request.strength, "eta": request.eta}
    for name, value in scales.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise GenerationError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise GenerationError(
                f"{name} must be a finite number, got {value}: give one, or leave it out for the default"
            )


def _size(request: GenerationRequest, sizes: SizeRule) -> tuple[int, int]:
    """(height, width): as asked, else an init image's or the first control image's (rounded down to the size
    multiple), else the export's."""
    height, width = request.height, request.width
    image = request.image
    if image is None and request.control_image is not None:
        control = request.control_image
        image = control[0] if isinstance(control, (list, tuple)) and control else control
    if image is not None and height is None and width is None and not isinstance(image, np.ndarray):
        height, width = sizes.round_down(*init_image_size(image))
    height = sizes.default[0] if height is None else height
    width = sizes.default[1] if width is None else width
    sizes.check(height, width)
    return height, width


def _scheduler(
    request: GenerationRequest, export: ExportFacts, steps: int, strength: float
) -> tuple[str, Scheduler, float | None]:
    """(name, the scheduler built from the export's config and the request's overrides, DDIM's eta)."""
    name = request.scheduler or export.default_scheduler
    options = dict(request.scheduler_options or {})
    spacing = request.timestep_spacing
    if spacing is not None:
        if spacing not in TIMESTEP_SPACINGS:
            raise GenerationError(f"unknown timestep_spacing '{spacing}': choose one of {', '.join(TIMESTEP_SPACINGS)}")
        options["timestep_spacing"] = spacing
    takes_eta = name == "ddim"
    scheduler = make_scheduler(name, export.scheduler_config, steps, options, eta=request.eta if takes_eta else 0.0)
    if request.eta and not takes_eta:
        warnings.warn(f"eta {request.eta:g} only applies to ddim: {name} ignores it", stacklevel=4)
    if request.image is not None:
        begin = img2img_begin_index(steps, strength, scheduler.order)
        if begin >= len(scheduler.timesteps):
            raise GenerationError(f"strength {strength} with {steps} steps leaves no step to run: raise either")
        scheduler = scheduler.starting_at(begin)
    return name, scheduler, request.eta if takes_eta else None
