"""What `sdexport validate` is asked to check, refused in one line when it cannot be checked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdruntime.manifest import Manifest
from sdruntime.schedulers import SCHEDULERS

from ..errors import SdexportError

PROMPTS = ("a photograph of an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse at dusk")
NEGATIVE_PROMPT = "blurry, low quality"


@dataclass
class ValidateOptions:
    """`sdexport validate`'s flags, as keyword arguments of `validate()`."""

    provider: str = "cpu"
    scheduler: str | None = None
    steps: int = 10
    seed: int = 0
    guidance_scale: float = 7.5
    strength: float = 0.75
    prompt: str | None = None  # the end-to-end runs' (None: PROMPTS[0])
    negative_prompt: str | None = None  # None: NEGATIVE_PROMPT
    height: int | None = None  # the end-to-end runs' size (default: the export's default size)
    width: int | None = None
    atol: float | None = None
    rtol: float | None = None
    min_psnr: float | None = None
    save_images: str | Path | None = None
    config: str | None = None  # single-file SOURCE: as `convert --config`
    prediction_type: str | None = None  # single-file SOURCE: as `convert --prediction-type`
    allow_pickle: bool = False  # single-file SOURCE: as `convert --allow-pickle`
    end_to_end: bool = True
    locate: bool = True  # look for the first fp16 node to blame in a failing fp16 component
    log: Callable[[str], None] = field(default=lambda line: None)

    def __post_init__(self):
        self.prompt = PROMPTS[0] if self.prompt is None else self.prompt
        self.negative_prompt = NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


def check_options(opts: ValidateOptions) -> None:
    """Refuse bad options before anything is loaded."""
    if opts.scheduler is not None and opts.scheduler not in SCHEDULERS:
        raise SdexportError(f"unknown scheduler '{opts.scheduler}': choose one of {', '.join(SCHEDULERS)}")
    if opts.steps < 1:
        raise SdexportError(f"--steps must be at least 1, got {opts.steps}")
    for name, value in (("--atol", opts.atol), ("--rtol", opts.rtol)):
        if value is not None and value <= 0:
            raise SdexportError(f"{name} must be positive, got {value}")
    if not 0.0 < opts.strength <= 1.0:
        raise SdexportError(f"strength must be in (0, 1], got {opts.strength}")
    for name, value in (("--height", opts.height), ("--width", opts.width)):
        if value is not None and value < 1:
            raise SdexportError(f"{name} must be positive, got {value}")


def image_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    """Two valid (height, width) in pixels: the default size and a non-square one (the static size only)."""
    if manifest.static:
        return [(manifest.static.height, manifest.static.width)]
    m = manifest.size_multiple
    height, width = manifest.pipeline.default_height, manifest.pipeline.default_width
    second = max(m, height // 2 // m * m)
    return [(height, width), (second if second != height else height + m, width)]


def end_to_end_size(manifest: Manifest, opts: ValidateOptions) -> tuple[int, int]:
    """The end-to-end runs' (height, width): the options' or the export's default size."""
    default = image_sizes(manifest)[0]
    height, width = opts.height or default[0], opts.width or default[1]
    if manifest.static and (height, width) != default:
        raise SdexportError(f"this export is static at {default[0]}x{default[1]}: drop --height/--width")
    for name, value in (("height", height), ("width", width)):
        if value % manifest.size_multiple:
            raise SdexportError(
                f"--{name} {value} is not a multiple of {manifest.size_multiple} (this export's size multiple)"
            )
    return height, width
