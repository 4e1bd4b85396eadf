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

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import InvalidArgument
from ..manifest import ExportError
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


# The schedulers on offer, in the order help texts list them; each class carries its name and its diffusers class
SCHEDULERS: dict[str, type[DiscreteScheduler]] = {
    cls.NAME: cls
    for cls in (
        PNDMScheduler,
        DDIMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverMultistepKarrasScheduler,
        LMSDiscreteScheduler,
        LCMScheduler,
    )
}
FALLBACK_SCHEDULER = "pndm"  # for an export whose scheduler class has no port here (diffusers' SD default)
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def scheduler_class(name: str) -> type[DiscreteScheduler]:
    """The scheduler called `name`; an unknown name is refused in one line that lists the known ones."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise InvalidArgument(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}") from None


def scheduler_name_for_class(class_name: str, config: Mapping[str, Any] | None = None) -> str | None:
    """Our name for a diffusers scheduler `_class_name`, or None when we have no port of it.

    A variant is chosen when the config sets what it forces: a DPMSolverMultistepScheduler config with
    `use_karras_sigmas` true maps to "dpm++2m-karras".
    """
    ports = sorted((c for c in SCHEDULERS.values() if c.DIFFUSERS_CLASS == class_name), key=lambda c: -len(c.OVERRIDES))
    for cls in ports:
        if all((config or {}).get(key) == value for key, value in cls.OVERRIDES.items()):
            return cls.NAME
    return None


def read_scheduler_config(folder: str | Path) -> dict[str, Any]:
    """An export's scheduler_config.json, as written: schedulers give the keys it lacks their own defaults.

    Exports made before the exporter kept the source's form have every key; they run as they always did.
    """
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing: run `sdexport convert` again to rewrite the export")
    return json.loads(path.read_text(encoding="utf-8"))


def exported_scheduler_name(config: Mapping[str, Any], class_name: str | None = None) -> str:
    """The scheduler an export runs unless asked otherwise: the port of its scheduler class (`class_name`,
    else the config's `_class_name`), or FALLBACK_SCHEDULER."""
    name = scheduler_name_for_class(class_name or config.get("_class_name", ""), config)
    return name or FALLBACK_SCHEDULER


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
    eta: float = 0.0,
) -> Scheduler:
    """Build scheduler `name` for `num_inference_steps` steps from a scheduler config dict (any diffusers
    scheduler's).

    `overrides` replace config values as keyword arguments to diffusers' `from_config(config, **overrides)` do,
    defaulted or not, e.g. {"timestep_spacing": "trailing"}; the variant's own setting (karras sigmas for
    dpm++2m-karras) still wins. `eta` is DDIM's only; `starting_at` enters the schedule part-way (img2img).
    """
    cls = scheduler_class(name)
    if overrides:
        unknown = sorted(set(overrides) - set(cls.DEFAULTS))
        if unknown:
            raise InvalidArgument(
                f"{name} has no setting {unknown[0]!r}: choose among {', '.join(sorted(cls.DEFAULTS))}"
            )
        defaulted = [k for k in config.get("_use_default_values") or () if k not in overrides]
        config = {**config, **overrides, "_use_default_values": defaulted}
    if cls is DDIMScheduler:
        return DDIMScheduler(config, num_inference_steps, eta=eta)
    if eta:
        raise InvalidArgument(f"eta applies only to ddim, not {name}")
    return cls(config, num_inference_steps)


__all__ = [
    "FALLBACK_SCHEDULER",
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
    "exported_scheduler_name",
    "img2img_begin_index",
    "make_scheduler",
    "read_scheduler_config",
    "scheduler_class",
    "scheduler_name_for_class",
]
