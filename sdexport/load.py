"""Resolve SOURCE (a diffusers folder, a single-file checkpoint, an offline preset or a hub id) to a PyTorch pipeline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from huggingface_hub import snapshot_download

from .errors import SdexportError
from .families import check_supported, is_sdxl_index
from .presets import available_presets, build_from_recipe
from .single_file import load_single_file

REQUIRED_PARTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "vocab.json",
    "scheduler": "scheduler_config.json",
}
# SDXL: both text encoders; a refiner has text_encoder_2 only (model_index.json names text_encoder null)
SDXL_PARTS = {**REQUIRED_PARTS, "text_encoder_2": "config.json", "tokenizer_2": "vocab.json"}


@dataclass
class Source:
    """A loaded pipeline and where it came from."""

    kind: str  # folder | preset | hub | single_file
    name: str
    pipe: object
    folder: Path | None = None
    loras: list[dict] = field(default_factory=list)
    vae: str = "pipeline"  # or the AutoencoderKL folder that replaced the pipeline's VAE (replace_vae)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SdexportError(f"{path} is not readable JSON ({e}): is this a diffusers pipeline folder?") from e


def check_pipeline_folder(folder: Path) -> None:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise SdexportError(
            f"{folder} is not a diffusers pipeline (no model_index.json): pass a folder saved by "
            "`save_pretrained`, a preset (`sdexport presets`) or a hub id"
        )
    model_index = _read_json(index_path)
    unet_config_path = folder / "unet" / "config.json"
    unet_config = _read_json(unet_config_path) if unet_config_path.is_file() else {}
    check_supported(model_index, unet_config, str(folder))
    parts = SDXL_PARTS if is_sdxl_index(model_index, unet_config) else REQUIRED_PARTS
    absent = {name for name, value in model_index.items() if isinstance(value, list) and value[:1] == [None]}
    for part, marker in ((p, m) for p, m in parts.items() if p not in absent):
        if not (folder / part / marker).is_file():
            raise SdexportError(
                f"{folder} is missing its {part} ({part}/{marker} not found): the pipeline folder is "
                "incomplete; save it again with `save_pretrained`"
            )
    weights = list((folder / "unet").glob("*.safetensors")) + list((folder / "unet").glob("*.bin"))
    if not weights:
        raise SdexportError(f"{folder}/unet has no weights (*.safetensors or *.bin): the folder is incomplete")


def _load_folder(folder: Path):
    model_index = _read_json(folder / "model_index.json")
    if is_sdxl_index(model_index, {}):
        cls = model_index.get("_class_name", "")
        refiner = "Img2Img" in cls or model_index.get("text_encoder", [None])[0] is None
        sdxl = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
        return sdxl.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    return StableDiffusionPipeline.from_pretrained(
        folder,
        torch_dtype=torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def load_source(
    source: str, config: str | None = None, prediction_type: str | None = None, allow_pickle: bool = False
) -> Source:
    """Resolve SOURCE in order: an existing path, an offline preset, then a hub id. config,
    prediction_type and allow_pickle apply to single-file checkpoints (sdexport/single_file.py)."""
    path = Path(source).expanduser()
    if path.is_file():
        pipe, _ = load_single_file(path, config, prediction_type, allow_pickle)
        return Source(kind="single_file", name=str(path.resolve()), pipe=pipe)
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
        return Source(kind="folder", name=str(path.resolve()), pipe=_load_folder(path), folder=path)
    presets = available_presets()
    if source in presets:
        folder = presets[source]
        if (folder / "recipe.json").is_file():
            return Source(kind="preset", name=source, pipe=build_from_recipe(folder), folder=folder)
        check_pipeline_folder(folder)
        return Source(kind="preset", name=source, pipe=_load_folder(folder), folder=folder)
    if _looks_like_hub_id(source) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return _load_hub(source)
    names = ", ".join(presets) or "none"
    raise SdexportError(
        f"source '{source}' not found: it is neither a folder nor a preset ({names}); "
        "hub ids need a network and HF_HUB_OFFLINE unset"
    )


def _load_hub(repo_id: str) -> Source:
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.txt", "*.safetensors", "*.md", "LICENSE*"],
                ignore_patterns=["*.fp16.*", "*non_ema*", "*ema-only*", "safety_checker/*"],
            )
        )
    except Exception as e:
        raise SdexportError(
            f"could not fetch '{repo_id}' from the model hub ({type(e).__name__}): check the id and the network"
        ) from e
    check_pipeline_folder(folder)
    return Source(kind="hub", name=repo_id, pipe=_load_folder(folder), folder=folder)


def replace_vae(src: Source, vae: str) -> None:
    """Put the diffusers AutoencoderKL in folder `vae` (or in its vae/ subfolder) in place of the
    pipeline's VAE, e.g. an fp16-safe SDXL VAE; its latent space must match the U-Net's."""

    folder = Path(vae).expanduser()
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise SdexportError(f"--vae {vae}: no config.json there; pass a diffusers AutoencoderKL folder")
    config = _read_json(folder / "config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise SdexportError(f"--vae {vae} is a {config['_class_name']}: pass a diffusers AutoencoderKL folder")
    latent = src.pipe.unet.config.in_channels
    if config.get("latent_channels", 4) != latent:
        raise SdexportError(
            f"--vae {vae} has {config.get('latent_channels', 4)} latent channels, the U-Net {latent}: "
            "choose a VAE made for this model family"
        )
    try:
        src.pipe.vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SdexportError(f"--vae {vae} could not be loaded ({type(e).__name__}: {e})") from e
    src.pipe.register_modules(vae=src.pipe.vae)
    src.vae = str(folder.resolve())
