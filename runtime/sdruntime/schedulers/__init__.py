"""NumPy ports of the diffusers schedulers the runtime offers, chosen by name.

Each scheduler is built from the contents of an exported ``scheduler_config.json`` (written by any diffusers
scheduler class) exactly as ``XScheduler.from_config(config)`` would read it, and produces the same timesteps
and samples as diffusers to float32 rounding. Keys the config sets carry over; keys it lacks (or lists in
``_use_default_values``) take the chosen class's own default, its ``DEFAULTS``: SD 1.5's config has no
``timestep_spacing``, so ``pndm`` runs ``leading`` and ``euler`` ``linspace``, as in diffusers. A denoising
loop uses them as the diffusers pipelines do::

    scheduler = make_scheduler("euler", config)
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, generator=generator)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import InvalidArgument
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepKarrasScheduler, DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler


class Scheduler(Protocol):
    """What the pipeline relies on; mirrors the diffusers scheduler API it uses."""

    DEFAULTS: ClassVar[dict[str, Any]]  # the diffusers class's `__init__` defaults: what a config lacks
    order: int
    init_noise_sigma: float
    timesteps: np.ndarray  # set by set_timesteps, the same values as diffusers' scheduler.timesteps

    def __init__(self, config: Mapping[str, Any]) -> None: ...

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def set_begin_index(self, begin_index: int = 0) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray: ...

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """One denoising step; returns the previous (less noisy) sample as float32. Schedulers that add
        noise use `noise` if given, else draw it from `generator`. DDIM's also takes `eta` (step_options)."""
        ...

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray: ...


SCHEDULERS: dict[str, type[Scheduler]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "dpm++2m-karras": DPMSolverMultistepKarrasScheduler,
    "lms": LMSDiscreteScheduler,
    "lcm": LCMScheduler,
}

_NAME_FOR_CLASS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a",
    "DPMSolverMultistepScheduler": "dpm++2m",
    "LMSDiscreteScheduler": "lms",
    "LCMScheduler": "lcm",
}


def scheduler_name_for_class(class_name: str, config: Mapping[str, Any] | None = None) -> str | None:
    """Our name for a diffusers scheduler `_class_name`, or None when we have no port of it.

    A DPMSolverMultistepScheduler config with `use_karras_sigmas` true maps to "dpm++2m-karras".
    """
    name = _NAME_FOR_CLASS.get(class_name)
    if name == "dpm++2m" and config is not None and config.get("use_karras_sigmas"):
        return "dpm++2m-karras"
    return name


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def make_scheduler(name: str, config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Scheduler:
    """Build scheduler `name` from a scheduler config dict (any diffusers scheduler's).

    `overrides` replace config values as keyword arguments to diffusers' `from_config(config, **overrides)` do,
    defaulted or not, e.g. {"timestep_spacing": "trailing"}; the variant's own setting (karras sigmas for
    dpm++2m-karras) still wins.
    """
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise InvalidArgument(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}") from None
    if overrides:
        unknown = sorted(set(overrides) - set(cls.DEFAULTS))
        if unknown:
            raise InvalidArgument(
                f"{name} has no setting {unknown[0]!r}: choose among {', '.join(sorted(cls.DEFAULTS))}"
            )
        defaulted = [k for k in config.get("_use_default_values") or () if k not in overrides]
        config = {**config, **overrides, "_use_default_values": defaulted}
    return cls(config)


__all__ = [
    "SCHEDULERS",
    "TIMESTEP_SPACINGS",
    "DDIMScheduler",
    "DPMSolverMultistepKarrasScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "Scheduler",
    "make_scheduler",
    "scheduler_name_for_class",
]


def step_options(scheduler: Scheduler, eta: float) -> dict[str, Any]:
    """The extra keyword arguments of `scheduler.step`: `eta` where the step takes it (DDIM), as
    diffusers' pipelines decide it from the step's signature."""
    return {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
