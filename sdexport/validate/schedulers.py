"""The diffusers scheduler each runtime scheduler mirrors, built from the exported scheduler config, and the
timesteps the denoiser is checked at: the U-Net's, or SD3's and Flux's as their pipelines schedule them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils import logging
from sdruntime.manifest import Manifest
from sdruntime.schedulers import (
    REGISTRY,
    exported_scheduler_name,
    read_scheduler_config,
    scheduler_class,
    serves_flow_matching,
)


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings about config keys another scheduler class wrote, for this block only."""
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def diffusers_scheduler(name: str, config: dict[str, Any]):
    """The diffusers scheduler our `name` mirrors, from the exported config itself (never another scheduler's),
    with the variant's overrides (`use_karras_sigmas` for dpm++2m-karras)."""
    ours = REGISTRY[name]
    cls = getattr(diffusers, ours.DIFFUSERS_CLASS)
    with quiet_diffusers():
        return cls.from_config(dict(config), **ours.OVERRIDES)


def chosen_scheduler(folder: Path, requested: str | None) -> tuple[str, dict[str, Any]]:
    """(runtime scheduler name, exported scheduler_config.json): `requested`, else the exported class's. A
    scheduler of the other kind than the export's (flow matching for SD3 and Flux, epsilon/v-prediction for the
    U-Nets) is refused in one line, as the runtime refuses it."""
    config = read_scheduler_config(folder)
    if requested is not None:
        scheduler_class(requested, serves_flow_matching(config))
    return requested or exported_scheduler_name(config), config


def flow_schedule(manifest: Manifest, scheduler, steps: int, size: tuple[int, int]) -> None:
    """Set `scheduler`'s timesteps as StableDiffusion3Pipeline and FluxPipeline do for `steps` steps at `size`:
    Flux with sigmas from 1 to 1/steps, and mu from the packed latents' length where the config shifts
    dynamically (always for Flux)."""
    facts, config = manifest.pipeline, scheduler.config
    kwargs = {}
    if facts.family == "flux":
        kwargs["sigmas"] = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
    if facts.family == "flux" or config.get("use_dynamic_shifting"):
        tokens = manifest.axis_sizes("transformer", 1, *size)["packed_sequence"]
        kwargs["mu"] = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    scheduler.set_timesteps(steps, **kwargs)


def reference_timesteps(
    name: str, config: dict[str, Any], steps: int, manifest: Manifest, size: tuple[int, int]
) -> list[float]:
    """The first and last timestep of the schedule as the denoiser takes them: a noisy and an almost clean
    input. SD3's transformer takes the scheduler's timestep (sigma x 1000), Flux's the sigma itself."""
    scheduler = diffusers_scheduler(name, config)
    if manifest.pipeline.transformer_family:
        flow_schedule(manifest, scheduler, steps, size)
    else:
        scheduler.set_timesteps(steps)
    scale = 1000.0 if manifest.pipeline.family == "flux" else 1.0
    timesteps = [float(t) / scale for t in scheduler.timesteps]
    return list(dict.fromkeys([timesteps[0], timesteps[-1]]))
