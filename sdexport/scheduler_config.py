"""The exported `scheduler/scheduler_config.json`, in the source's own form: only the keys the source set.

diffusers remembers which arguments a scheduler took from its own defaults (`_use_default_values` on the
loaded config), and `OtherScheduler.from_config(pipe.scheduler.config)` gives those the new class's defaults:
SD 1.5's hub config has no `timestep_spacing`, so PNDM runs `leading` while Euler, DPM++ and LMS run
`linspace`. `save_config` writes every key and drops that list, so a swap made from the written file would
carry PNDM's `leading` over. Writing only the explicit keys (plus `_class_name` and `_diffusers_version`)
keeps the distinction in the place every reader already looks:

- diffusers and optimum (`XScheduler.from_pretrained(folder)`) rebuild the same scheduler, with the same
  `_use_default_values`, as loading the source did;
- the runtime, like `from_config`, gives every key the file lacks the chosen class's own default;
- the file is what a hub model folder holds, so older readers that know nothing of `_use_default_values`
  read it right too (a separate list beside a full config would be one more thing each of them must honour).

A defaulted key whose value was changed after loading (StableDiffusionPipeline sets `steps_offset` to 1 and
`clip_sample` to false on old configs) is written, with its new value: the exported scheduler then runs as the
source pipeline's did, and so do swaps (where diffusers' own swap would fall back to the new class's default).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np

CONFIG_NAME = "scheduler_config.json"


def explicit_scheduler_config(scheduler) -> dict[str, Any]:
    """The keys of a diffusers scheduler's config that did not come from its class's defaults, JSON-ready."""

    config = dict(scheduler.config)
    defaulted = set(config.pop("_use_default_values", None) or ())
    signature = inspect.signature(type(scheduler).__init__).parameters
    kept = {
        key: value
        for key, value in config.items()
        if key not in defaulted or key not in signature or not _equal(value, signature[key].default)
    }
    kept.pop("_ignore_files", None)
    kept["_class_name"] = type(scheduler).__name__
    # the writer's version, as save_config writes it (a scheduler's repr already sets it so in memory)
    kept["_diffusers_version"] = diffusers.__version__
    return {key: _json_ready(value) for key, value in kept.items()}


def write_scheduler_config(scheduler, folder: Path) -> Path:
    """Write `folder/scheduler_config.json` with the explicit keys only (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(explicit_scheduler_config(scheduler), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _equal(value: Any, default: Any) -> bool:
    if default is inspect.Parameter.empty:
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError):  # e.g. an array against None
        return False


def _json_ready(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    return value
