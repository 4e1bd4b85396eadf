"""What `sdexport validate` is asked to check, refused in one line when it cannot be checked."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdruntime.manifest import CONTROLNET, Manifest, component_kind
from sdruntime.plan import SizeRule, family_defaults

from ..controlnet import ControlNetSource, check_controlnet_sources
from ..errors import SdexportError

PROMPTS = ("a photograph of an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse at dusk")
NEGATIVE_PROMPT = "blurry, low quality"
# diffusers' default guidance of StableDiffusion3Pipeline and FluxPipeline (Flux dev's embedded guidance)
TRANSFORMER_GUIDANCE = {"sd3": 7.0, "flux": 3.5}


@dataclass
class ValidateOptions:
    """`sdexport validate`'s flags, as keyword arguments of `validate()`."""

    provider: str = "cpu"
    scheduler: str | None = None
    steps: int = 10
    seed: int = 0
    guidance_scale: float | None = None  # None: the family's default, as the runtime's (plan.family_defaults)
    strength: float = 0.75
    prompt: str | None = None  # the end-to-end runs' (None: PROMPTS[0])
    negative_prompt: str | None = None  # None: NEGATIVE_PROMPT
    height: int | None = None  # the runs' size, end to end and per component (default: the export's default size)
    width: int | None = None
    atol: float | None = None
    rtol: float | None = None
    min_psnr: float | None = None
    save_images: str | Path | None = None
    config: str | None = None  # single-file SOURCE: as `convert --config`
    prediction_type: str | None = None  # single-file SOURCE: as `convert --prediction-type`
    allow_pickle: bool = False  # single-file SOURCE: as `convert --allow-pickle`
    controlnets: tuple[str, ...] = ()  # `[NAME=]PATH` as for convert: the PyTorch ControlNet of controlnet/NAME
    end_to_end: bool = True
    locate: bool = True  # look for the first fp16 node to blame in a failing fp16 component
    log: Callable[[str], None] = field(default=lambda line: None)

    def __post_init__(self):
        self.prompt = PROMPTS[0] if self.prompt is None else self.prompt
        self.negative_prompt = NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt
        self.controlnets = tuple(self.controlnets)


def check_options(opts: ValidateOptions) -> None:
    """Refuse bad options before anything is loaded (the scheduler's name with the export's scheduler config:
    schedulers.chosen_scheduler)."""
    if opts.steps < 1:
        raise SdexportError(f"--steps must be at least 1, got {opts.steps}")
    for name, value in (("--atol", opts.atol), ("--rtol", opts.rtol)):
        if value is not None and value <= 0:
            raise SdexportError(f"{name} must be positive, got {value}")
    if not 0.0 < opts.strength <= 1.0:
        raise SdexportError(f"strength must be in (0, 1], got {opts.strength}")
    if opts.end_to_end and int(opts.steps * opts.strength) < 1:  # diffusers then denoises nothing, and fails
        least = math.ceil(1 / opts.strength)
        raise SdexportError(
            f"--steps {opts.steps} at strength {opts.strength:g} gives the image runs no step to take: "
            f"give --steps {least} or more"
        )
    for name, value in (("--height", opts.height), ("--width", opts.width)):
        if value is not None and value < 1:
            raise SdexportError(f"{name} must be positive, got {value}")


def image_sizes(manifest: Manifest, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Two valid (height, width) in pixels: `size` (the end-to-end runs', by default the export's default size)
    and a non-square one (the static size only)."""
    if manifest.static:
        return [(manifest.static.height, manifest.static.width)]
    m = manifest.size_multiple
    height, width = size
    second = max(m, height // 2 // m * m)
    return [(height, width), (second if second != height else height + m, width)]


def end_to_end_size(manifest: Manifest, opts: ValidateOptions) -> tuple[int, int]:
    """The end-to-end runs' (height, width): the options' or the export's default size, checked by the
    runtime's size rule."""
    sizes = SizeRule.of(manifest)
    height, width = opts.height or sizes.default[0], opts.width or sizes.default[1]
    sizes.check(height, width)
    return height, width


def guidance_scale(manifest: Manifest, opts: ValidateOptions) -> float:
    """The end-to-end runs' guidance scale: the options', else the family's default (diffusers' for SD3 and Flux)."""
    if opts.guidance_scale is not None:
        return opts.guidance_scale
    family = manifest.pipeline.family
    return TRANSFORMER_GUIDANCE.get(family) or family_defaults(family).guidance_scale


def exported_controlnets(manifest: Manifest) -> list[str]:
    """The export's ControlNet components ("controlnet/NAME"), in the manifest's order."""
    return [c for c in manifest.components if component_kind(c) == CONTROLNET]


def check_controlnets(manifest: Manifest, opts: ValidateOptions) -> list[ControlNetSource]:
    """Each `--controlnet`, located as convert locates it, and naming a ControlNet the export has."""
    sources = check_controlnet_sources(opts.controlnets)
    names = [c.split("/", 1)[1] for c in exported_controlnets(manifest)]
    for source in sources:
        if not manifest.has(source.component):
            has = f"it has {', '.join(names)}" if names else "it has none"
            raise SdexportError(
                f"--controlnet: {manifest.folder} has no ControlNet named '{source.name}' ({has}); "
                "give the exported NAME as NAME=PATH"
            )
    return sources
