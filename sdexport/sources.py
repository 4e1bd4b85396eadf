"""Where SOURCE is (a single file, a diffusers folder, an offline preset or a hub id), decided without
torch: `sdexport convert` refuses a missing or broken source in one line before it imports the libraries
that load it (load.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SdexportError
from .families import check_supported, index_family, is_sdxl_index
from .presets import available_presets

REQUIRED_PARTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "vocab.json",
    "scheduler": "scheduler_config.json",
}
# SDXL: both text encoders; a refiner has text_encoder_2 only (model_index.json names text_encoder null)
SDXL_PARTS = {**REQUIRED_PARTS, "text_encoder_2": "config.json", "tokenizer_2": "vocab.json"}
# the transformer families' parts (the T5 tokenizer may be tokenizer.json or spiece.model: its config names it)
TRANSFORMER_PARTS = {
    "sd3": {
        "transformer": "config.json",
        "vae": "config.json",
        "text_encoder": "config.json",
        "text_encoder_2": "config.json",
        "tokenizer": "vocab.json",
        "tokenizer_2": "vocab.json",
        "scheduler": "scheduler_config.json",
    },
    "flux": {
        "transformer": "config.json",
        "vae": "config.json",
        "text_encoder": "config.json",
        "text_encoder_2": "config.json",
        "tokenizer": "vocab.json",
        "tokenizer_2": "tokenizer_config.json",
        "scheduler": "scheduler_config.json",
    },
}


@dataclass(frozen=True)
class SourceLocation:
    """Which kind of source SOURCE names, and where it is: a path for a single file, a folder or a preset's
    folder; None for a hub id, which is fetched when loaded."""

    kind: str  # single_file | folder | preset | hub
    path: Path | None


def locate_source(
    source: str, config: str | None = None, prediction_type: str | None = None, allow_pickle: bool = False
) -> SourceLocation:
    """Resolve SOURCE in order: an existing path, an offline preset, then a hub id; a folder is checked to
    hold a supported diffusers pipeline. config, prediction_type and allow_pickle apply to single files."""
    path = Path(source).expanduser()
    if path.is_file():
        return SourceLocation("single_file", path)
    given = [
        flag
        for flag, value in (
            ("--config", config),
            ("--prediction-type", prediction_type),
            ("--allow-pickle", allow_pickle),
        )
        if value
    ]
    if given:
        raise SdexportError(f"{given[0]} applies to single-file checkpoints only, and '{source}' is not a file")
    if path.exists():
        check_pipeline_folder(path)
        return SourceLocation("folder", path)
    presets = available_presets()
    if source in presets:
        if not (presets[source] / "recipe.json").is_file():
            check_pipeline_folder(presets[source])
        return SourceLocation("preset", presets[source])
    if _looks_like_hub_id(source) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return SourceLocation("hub", None)
    names = ", ".join(presets) or "none"
    raise SdexportError(
        f"source '{source}' not found: it is neither a folder nor a preset ({names}); "
        "hub ids need a network and HF_HUB_OFFLINE unset"
    )


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def read_json(path: Path, fix: str = "is this a diffusers pipeline folder?") -> dict:
    """A config file's JSON; one line naming the file and `fix` when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SdexportError(f"{path} is not readable JSON ({e}): {fix}") from e


def check_pipeline_folder(folder: Path) -> None:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise SdexportError(
            f"{folder} is not a diffusers pipeline (no model_index.json): pass a folder saved by "
            "`save_pretrained`, a preset (`sdexport presets`) or a hub id"
        )
    model_index = read_json(index_path)
    unet_config_path = folder / "unet" / "config.json"
    unet_config = read_json(unet_config_path) if unet_config_path.is_file() else {}
    check_supported(model_index, unet_config, str(folder))
    family = index_family(model_index)
    parts = SDXL_PARTS if is_sdxl_index(model_index, unet_config) else REQUIRED_PARTS
    parts = TRANSFORMER_PARTS[family] if family else parts
    absent = {name for name, value in model_index.items() if isinstance(value, list) and value[:1] == [None]}
    for part, marker in ((p, m) for p, m in parts.items() if p not in absent):
        if not (folder / part / marker).is_file():
            raise SdexportError(
                f"{folder} is missing its {part} ({part}/{marker} not found): the pipeline folder is "
                "incomplete; save it again with `save_pretrained`"
            )
    denoiser = folder / ("transformer" if family else "unet")
    weights = list(denoiser.glob("*.safetensors")) + list(denoiser.glob("*.bin"))
    if not weights:
        raise SdexportError(f"{denoiser} has no weights (*.safetensors or *.bin): the folder is incomplete")
