"""Offline presets: small pipelines built from recipes under `models/`, no model hub needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SdexportError

DEFAULT_PRESET = "shapes"  # the small trained model in models/shapes: real pictures, offline


def models_dir() -> Path:
    """The repository's `models/` folder (or $SDEXPORT_MODELS)."""
    return Path(os.environ.get("SDEXPORT_MODELS", Path(__file__).resolve().parent.parent / "models"))


def available_presets() -> dict[str, Path]:
    """Preset name -> its folder: a `recipe.json` (random weights) or a saved diffusers pipeline."""
    root = models_dir()
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "recipe.json").is_file() or (folder / "model_index.json").is_file():
            found[folder.name] = folder
    return found


def preset_description(folder: Path) -> str:
    if (folder / "recipe.json").is_file():
        return json.loads((folder / "recipe.json").read_text())["description"]
    card = folder / "README.md"
    lines = card.read_text().splitlines() if card.is_file() else []
    return next((line for line in lines if line and not line.startswith(("#", "---"))), "")


def build_from_recipe(folder: Path):
    """Build a diffusers StableDiffusionPipeline with seeded random weights from `recipe.json`."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    recipe = json.loads((folder / "recipe.json").read_text())
    configs = recipe_configs(folder, recipe)
    tokenizer_dir = (folder / recipe["tokenizer"]).resolve()
    # SD 2.x pads with "!" (id 0), SD 1.x with <|endoftext|>
    pad = {"pad_token": "!"} if recipe.get("family", "sd1") == "sd2" else {}
    tokenizer = CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
        model_max_length=configs["text_encoder"]["max_position_embeddings"], **pad,
    )
    seed = int(recipe.get("seed", 0))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(configs["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler_config = dict(configs["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler_config.pop("_class_name"))
    scheduler = scheduler_cls.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe


def recipe_configs(folder: Path, recipe: dict) -> dict[str, dict]:
    """Component configs: inline in the recipe, or read from a diffusers config folder ("configs")."""
    if "configs" not in recipe:
        return {k: recipe[k] for k in ("unet", "vae", "text_encoder", "scheduler")}
    root = (folder / recipe["configs"]).resolve()
    files = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    return {k: json.loads((root / f).read_text()) for k, f in files.items()}


def resolve_preset(name: str) -> Path:
    presets = available_presets()
    if name not in presets:
        raise SdexportError(
            f"unknown preset '{name}': choose one of {', '.join(presets) or '(none found)'}"
            " (see `sdexport presets`)"
        )
    return presets[name]
