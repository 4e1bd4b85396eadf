"""NumPy ports of the diffusers schedulers the runtime offers, chosen by name.

Each scheduler is built from the contents of an exported ``scheduler_config.json`` (written by any diffusers
scheduler class) exactly as ``XScheduler.from_config(config)`` would read it, and produces the same timesteps
and samples as diffusers to float32 rounding. Keys the config sets carry over; keys it lacks (or lists in
``_use_default_values``) take the chosen class's own default, its ``DEFAULTS``: SD 1.5's config has no
``timestep_spacing``, so ``pndm`` runs ``leading`` and ``euler`` ``linspace``, as in diffusers.

The schedule is fixed when a scheduler is built, and the loop passes the step index, as k-diffusion's
samplers and Apple's Core ML schedulers do. Noise that a step adds (ancestral, SDE and LCM steps, DDIM with
eta > 0) is drawn by the loop, from its own generator, only where ``needs_noise(i)`` says so: the same draws
diffusers' schedulers make from a torch generator::

    scheduler = make_scheduler("euler", config, steps)
    latents = noise * scheduler.init_noise_sigma
    for i in scheduler.step_indices:
        eps = unet(scheduler.scale_model_input(latents, i), scheduler.timesteps[i])
        step_noise = randn_tensor(latents.shape, generator) if scheduler.needs_noise(i) else None
        latents = scheduler.step(i, eps, latents, step_noise)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import InvalidArgument
from ._common import DiscreteScheduler
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepKarrasScheduler, DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler


class Scheduler(Protocol):
    """What the denoising loop relies on (the base class is `_common.DiscreteScheduler`)."""

    DEFAULTS: ClassVar[dict[str, Any]]  # the diffusers class's `__init__` defaults: what a config lacks
    config: dict[str, Any]  # the resolved config
    order: int
    init_noise_sigma: float
    timesteps: np.ndarray  # the whole schedule, the same values as diffusers' scheduler.timesteps
    begin_index: int  # where the loop starts (img2img)

    @property
    def step_indices(self) -> range: ...

    def starting_at(self, begin_index: int) -> Scheduler: ...

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray: ...

    def needs_noise(self, i: int) -> bool: ...

    def step(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Step `i`; returns the previous (less noisy) sample as float32."""
        ...

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int | np.ndarray) -> np.ndarray: ...


SCHEDULERS: dict[str, type[DiscreteScheduler]] = {
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


def img2img_begin_index(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """Where an img2img run enters the schedule: StableDiffusionImg2ImgPipeline.get_timesteps's t_start.
    At strength 0 it is past the end: no step is left to run."""
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_steps, 0) * order


def make_scheduler(
    name: str,
    config: Mapping[str, Any],
    num_inference_steps: int,
    overrides: Mapping[str, Any] | None = None,
    *,
    begin_index: int = 0,
    eta: float = 0.0,
) -> Scheduler:
    """Build scheduler `name` for `num_inference_steps` steps from a scheduler config dict (any diffusers
    scheduler's).

    `overrides` replace config values as keyword arguments to diffusers' `from_config(config, **overrides)` do,
    defaulted or not, e.g. {"timestep_spacing": "trailing"}; the variant's own setting (karras sigmas for
    dpm++2m-karras) still wins. `begin_index` starts the loop part-way in (img2img); `eta` is DDIM's only.
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
    if cls is DDIMScheduler:
        return DDIMScheduler(config, num_inference_steps, begin_index, eta=eta)
    if eta:
        raise InvalidArgument(f"eta applies only to ddim, not {name}")
    return cls(config, num_inference_steps, begin_index)


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
    "img2img_begin_index",
    "make_scheduler",
    "scheduler_name_for_class",
]
