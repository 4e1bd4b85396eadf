"""The diffusers scheduler each runtime scheduler mirrors, built from the exported scheduler config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
from diffusers.utils import logging
from sdruntime.schedulers import SCHEDULERS, exported_scheduler_name, read_scheduler_config


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
    ours = SCHEDULERS[name]
    cls = getattr(diffusers, ours.DIFFUSERS_CLASS)
    with quiet_diffusers():
        return cls.from_config(dict(config), **ours.OVERRIDES)


def chosen_scheduler(folder: Path, requested: str | None) -> tuple[str, dict[str, Any]]:
    """(runtime scheduler name, exported scheduler_config.json): `requested`, else the exported class's."""
    config = read_scheduler_config(folder)
    return requested or exported_scheduler_name(config), config


def reference_timesteps(name: str, config: dict[str, Any], steps: int) -> list[float]:
    """The first and last timestep of the schedule: a noisy and an almost clean U-Net input."""
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    return list(dict.fromkeys([timesteps[0], timesteps[-1]]))
