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

Flow-matching schedulers (SD3, Flux: the model predicts velocity) sit in the same registry and say so
(`FLOW_MATCHING`); an export's scheduler config says which kind of model it is (`serves_flow_matching`), and a
scheduler of the other kind is refused in one line. `SCHEDULERS` lists the epsilon/v-prediction ones that
today's exports (SD 1.x/2.x, SDXL, LCM) run, `FLOW_SCHEDULERS` the others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
from .flow_match_euler import FlowMatchEulerDiscreteScheduler, calculate_shift, flow_img2img_begin_index, image_mu
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler


class Scheduler(Protocol):
    """What the denoising loop relies on (the base class is `_common.DiscreteScheduler`)."""

    DEFAULTS: ClassVar[dict[str, Any]]  # the diffusers class's `__init__` defaults: what a config lacks
    FLOW_MATCHING: ClassVar[bool]  # serves flow-matching (velocity) models, not epsilon/v-prediction ones
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


# Every scheduler, by name; each class carries its name, its diffusers class and the kind of model it serves
REGISTRY: dict[str, type[DiscreteScheduler]] = {
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
        FlowMatchEulerDiscreteScheduler,
    )
}
# Those of epsilon/v-prediction exports, in the order help texts list them: what the CLI, server and validate offer
SCHEDULERS: dict[str, type[DiscreteScheduler]] = {n: c for n, c in REGISTRY.items() if not c.FLOW_MATCHING}
FLOW_SCHEDULERS: dict[str, type[DiscreteScheduler]] = {n: c for n, c in REGISTRY.items() if c.FLOW_MATCHING}
FALLBACK_SCHEDULER = "pndm"  # for an export whose scheduler class has no port here (diffusers' SD default)
FALLBACK_FLOW_SCHEDULER = "flow-match-euler"  # the same for a flow-matching export (SD3's and Flux's own)
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def serves_flow_matching(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching model's (SD3, Flux): its class is one of diffusers' FlowMatch*."""
    return str(config.get("_class_name") or "").startswith("FlowMatch")


def scheduler_class(name: str, flow_matching: bool = False) -> type[DiscreteScheduler]:
    """The scheduler called `name`, for an export of the kind `flow_matching` says (`serves_flow_matching`;
    epsilon/v-prediction by default). An unknown name, or one of the other kind, is refused in one line that
    lists the names that fit."""
    fitting = FLOW_SCHEDULERS if flow_matching else SCHEDULERS
    cls = REGISTRY.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown scheduler {name!r}: choose one of {', '.join(fitting)}")
    if cls.FLOW_MATCHING != flow_matching:
        kinds = ("flow-matching (SD3, Flux)", "epsilon/v-prediction (SD 1.x/2.x, SDXL)")
        ours, other = kinds if cls.FLOW_MATCHING else kinds[::-1]
        raise InvalidArgument(f"{name} serves {ours} models, not this {other} one: choose one of {', '.join(fitting)}")
    return cls


def scheduler_name_for_class(class_name: str, config: Mapping[str, Any] | None = None) -> str | None:
    """Our name for a diffusers scheduler `_class_name`, or None when we have no port of it.

    A variant is chosen when the config sets what it forces: a DPMSolverMultistepScheduler config with
    `use_karras_sigmas` true maps to "dpm++2m-karras".
    """
    ports = sorted((c for c in REGISTRY.values() if c.DIFFUSERS_CLASS == class_name), key=lambda c: -len(c.OVERRIDES))
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
    else the config's `_class_name`), or FALLBACK_SCHEDULER (FALLBACK_FLOW_SCHEDULER for a flow-matching one)."""
    name = scheduler_name_for_class(class_name or config.get("_class_name", ""), config)
    return name or (FALLBACK_FLOW_SCHEDULER if serves_flow_matching(config) else FALLBACK_SCHEDULER)


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
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
) -> Scheduler:
    """Build scheduler `name` for `num_inference_steps` steps from a scheduler config dict (any diffusers
    scheduler's).

    `overrides` replace config values as keyword arguments to diffusers' `from_config(config, **overrides)` do,
    defaulted or not, e.g. {"timestep_spacing": "trailing"}; the variant's own setting (karras sigmas for
    dpm++2m-karras) still wins. `eta` is DDIM's only; `sigmas` (custom ones) and `mu` (dynamic shifting's,
    `image_mu`) are the flow-matching schedulers' only; `starting_at` enters the schedule part-way (img2img).
    A scheduler for the other kind of model than the config's (`serves_flow_matching`) is refused.
    """
    cls = scheduler_class(name, serves_flow_matching(config))
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
    if cls.FLOW_MATCHING:
        return cls(config, num_inference_steps, sigmas=sigmas, mu=mu)
    if sigmas is not None or mu is not None:
        raise InvalidArgument(f"sigmas and mu apply only to flow-matching schedulers ({', '.join(FLOW_SCHEDULERS)})")
    return cls(config, num_inference_steps)


__all__ = [
    "FALLBACK_FLOW_SCHEDULER",
    "FALLBACK_SCHEDULER",
    "FLOW_SCHEDULERS",
    "REGISTRY",
    "SCHEDULERS",
    "TIMESTEP_SPACINGS",
    "DDIMScheduler",
    "DPMSolverMultistepKarrasScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "Scheduler",
    "calculate_shift",
    "exported_scheduler_name",
    "flow_img2img_begin_index",
    "image_mu",
    "img2img_begin_index",
    "make_scheduler",
    "read_scheduler_config",
    "scheduler_class",
    "scheduler_name_for_class",
    "serves_flow_matching",
]
