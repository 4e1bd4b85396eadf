"""Offline presets: small pipelines built from recipes under `models/`, no model hub needed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import SdexportError

DEFAULT_PRESET = "shapes"  # the small trained model in models/shapes: real pictures, offline


def models_dir() -> Path:
    """$SDEXPORT_MODELS, else the shipped models: `sdexport/models` in an installed wheel (pyproject.toml
    maps the repository's `models/` there), else the repository's `models/` (a checkout or editable install)."""
    if "SDEXPORT_MODELS" in os.environ:
        return Path(os.environ["SDEXPORT_MODELS"])
    package = Path(__file__).resolve().parent
    installed = package / "models"
    return installed if installed.is_dir() else package.parent / "models"


def available_presets() -> dict[str, Path]:
    """Preset name -> its folder: a `recipe.json` (random weights) or a saved diffusers pipeline."""
    root = models_dir()
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "recipe.json").is_file() and _recipe_kind(folder) not in ("controlnet", TINY_VAE_KIND):
            found[folder.name] = folder
        elif (folder / "model_index.json").is_file():
            found[folder.name] = folder
    return found


def _recipe_kind(folder: Path) -> str:
    return json.loads((folder / "recipe.json").read_text()).get("kind", "pipeline")


def controlnet_presets() -> dict[str, Path]:
    """ControlNet preset name -> its folder: a `recipe.json` of kind "controlnet" (random weights)."""
    root = models_dir()
    if not root.is_dir():
        return {}
    folders = sorted(p for p in root.iterdir() if (p / "recipe.json").is_file())
    return {folder.name: folder for folder in folders if _recipe_kind(folder) == "controlnet"}


TINY_VAE_KIND = "tiny_vae"  # a recipe.json of this kind builds an AutoencoderTiny (TAESD's family) for --tiny-vae


def tiny_vae_presets() -> dict[str, Path]:
    """Tiny-VAE preset name -> its folder: a `recipe.json` of kind "tiny_vae" (random weights)."""
    root = models_dir()
    if not root.is_dir():
        return {}
    folders = sorted(p for p in root.iterdir() if (p / "recipe.json").is_file())
    return {folder.name: folder for folder in folders if _recipe_kind(folder) == TINY_VAE_KIND}


def build_tiny_vae_from_recipe(folder: Path):
    """The AutoencoderTiny of a "tiny_vae" recipe: its config with seeded random weights (build_tiny_vae)."""
    recipe = json.loads((folder / "recipe.json").read_text())
    return build_tiny_vae(recipe["config"], int(recipe.get("seed", 0)))


def build_tiny_vae(config: dict, seed: int = 0):
    """A diffusers AutoencoderTiny with seeded random weights whose pictures are not flat: PyTorch's default
    initialization shrinks the activations layer by layer (a decoded image came out -0.98 +- 0.05, black once
    clamped), so each part's last convolution is rescaled on a seeded probe, the decoder's to pixels of mean 0
    and spread 0.5 in [-1, 1], the encoder's to latents of spread 1, as a trained TAESD gives."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny.from_config(config).eval()
    probe = torch.Generator().manual_seed(seed)
    factor = int(vae.config.upsampling_scaling_factor) ** (len(vae.config.num_decoder_blocks) - 1)
    latents = torch.randn(2, vae.config.latent_channels, 8, 8, generator=probe)
    images = torch.rand(2, vae.config.in_channels, 8 * factor, 8 * factor, generator=probe) * 2 - 1
    with torch.no_grad():
        # DecoderTiny computes in [0, 1] (mean 0.5, spread 0.25) and returns x * 2 - 1
        _rescale_last_conv(vae.decoder, torch.tanh(latents / 3) * 3, mean=0.5, std=0.25)
        _rescale_last_conv(vae.encoder, images.add(1).div(2), mean=0.0, std=1.0)
    return vae


def _rescale_last_conv(part, inputs, mean: float, std: float) -> None:
    """Scale the last convolution of `part.layers` (EncoderTiny's and DecoderTiny's have a bias) so that its
    output over `inputs` has this mean and spread in each channel."""
    import torch

    hidden = part.layers[:-1](inputs)
    conv = part.layers[-1]
    out = torch.nn.functional.conv2d(hidden, conv.weight, None, conv.stride, conv.padding)
    scale = std / out.std(dim=(0, 2, 3))  # per output channel
    conv.weight.mul_(scale[:, None, None, None])
    conv.bias.copy_(mean - out.mean(dim=(0, 2, 3)) * scale)


def build_controlnet_from_recipe(folder: Path):
    """A ControlNetModel with seeded random weights that fits the U-Net of the preset the recipe names
    ("for"): diffusers' from_unet layout, not its weights; the zero convolutions diffusers starts at zero
    get PyTorch's default initialization, so the residuals are not zeros."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    recipe = json.loads((folder / "recipe.json").read_text())
    target = folder.parent / recipe["for"]
    unet_config = recipe_configs(target, json.loads((target / "recipe.json").read_text()))["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    torch.manual_seed(int(recipe.get("seed", 0)))
    options = {"conditioning_embedding_out_channels": tuple(recipe["conditioning_embedding_out_channels"])}
    model = ControlNetModel.from_unet(unet, load_weights_from_unet=False, **options)
    zero_initialized = [
        *model.controlnet_down_blocks,
        model.controlnet_mid_block,
        model.controlnet_cond_embedding.conv_out,
    ]
    for conv in zero_initialized:
        conv.reset_parameters()
    return model.eval()


def preset_description(folder: Path) -> str:
    if (folder / "recipe.json").is_file():
        return json.loads((folder / "recipe.json").read_text())["description"]
    card = folder / "README.md"
    lines = card.read_text().splitlines() if card.is_file() else []
    return next((line for line in lines if line and not line.startswith(("#", "---"))), "")


def build_from_recipe(folder: Path):
    """Build a diffusers pipeline with seeded random weights from `recipe.json`: a
    StableDiffusionPipeline (or the recipe's "pipeline" class: StableDiffusionInpaintPipeline), or for family "sdxl" a StableDiffusionXLPipeline (an
    StableDiffusionXLImg2ImgPipeline refiner when the recipe has no text_encoder)."""
    # torch, diffusers and transformers load lazily here and below: `sdexport --help` and `presets`
    # read this module, and importing them takes seconds
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    recipe = json.loads((folder / "recipe.json").read_text())
    family = recipe.get("family", "sd1")
    configs = recipe_configs(folder, recipe)
    seed = int(recipe.get("seed", 0))
    if family in ("sd3", "flux"):
        return _build_transformer_pipeline(folder, recipe, configs, seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(configs["vae"])
    scheduler = _scheduler(configs["scheduler"])
    if family == "sdxl":
        return _build_sdxl(folder, recipe, configs, seed, unet, vae, scheduler)
    torch.manual_seed(seed + 2)
    text_encoder = _text_encoder(configs["text_encoder"])
    # SD 2.x pads with "!" (id 0), SD 1.x with <|endoftext|>
    tokenizer = _tokenizer(folder / recipe["tokenizer"], configs["text_encoder"], pad_with_bang=family == "sd2")
    pipeline_class = getattr(diffusers, recipe.get("pipeline", "StableDiffusionPipeline"))
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(folder: Path, recipe: dict, configs: dict, seed: int, unet, vae, scheduler):
    """SDXL: tokenizer 1 pads with <|endoftext|>, tokenizer_2 with "!" (id 0), as SDXL base's do."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    parts = {"vae": vae, "unet": unet, "scheduler": scheduler}
    if "text_encoder" in configs:
        torch.manual_seed(seed + 2)
        parts["text_encoder"] = _text_encoder(configs["text_encoder"])
        parts["tokenizer"] = _tokenizer(folder / recipe["tokenizer"], configs["text_encoder"], pad_with_bang=False)
    torch.manual_seed(seed + 3)
    parts["text_encoder_2"] = _text_encoder(configs["text_encoder_2"], projection=True)
    parts["tokenizer_2"] = _tokenizer(folder / recipe["tokenizer_2"], configs["text_encoder_2"], pad_with_bang=True)
    flags = {
        "force_zeros_for_empty_prompt": bool(recipe.get("force_zeros_for_empty_prompt", True)),
        "add_watermarker": False,
    }
    if recipe.get("pipeline") == "StableDiffusionXLInpaintPipeline":
        from diffusers import StableDiffusionXLInpaintPipeline

        aesthetic = bool(recipe.get("requires_aesthetics_score", False))
        encoder = {"text_encoder": parts.pop("text_encoder", None), "tokenizer": parts.pop("tokenizer", None)}
        return StableDiffusionXLInpaintPipeline(**encoder, **parts, **flags, requires_aesthetics_score=aesthetic)
    if "text_encoder" not in configs or recipe.get("requires_aesthetics_score"):
        return StableDiffusionXLImg2ImgPipeline(
            text_encoder=parts.pop("text_encoder", None),
            tokenizer=parts.pop("tokenizer", None),
            **parts,
            **flags,
            requires_aesthetics_score=bool(recipe.get("requires_aesthetics_score", False)),
        )
    return StableDiffusionXLPipeline(**parts, **flags)


def _build_transformer_pipeline(folder: Path, recipe: dict, configs: dict, seed: int):
    """SD3 (CLIP-L and CLIP-G with projections, T5 unless the recipe leaves it out, the MMDiT) or Flux
    (CLIP-L, T5, the Flux transformer), with the 16-channel VAE, each module seeded in turn."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL

    family = recipe["family"]
    parts = {}
    torch.manual_seed(seed)
    transformer_class = "SD3Transformer2DModel" if family == "sd3" else "FluxTransformer2DModel"
    parts["transformer"] = getattr(diffusers, transformer_class).from_config(configs["transformer"])
    torch.manual_seed(seed + 1)
    parts["vae"] = AutoencoderKL.from_config(configs["vae"])
    parts["scheduler"] = _scheduler(configs["scheduler"])
    torch.manual_seed(seed + 2)
    parts["text_encoder"] = _text_encoder(configs["text_encoder"], projection=family == "sd3")
    parts["tokenizer"] = _tokenizer(folder / recipe["tokenizer"], configs["text_encoder"], pad_with_bang=False)
    t5_name = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    if family == "sd3":
        torch.manual_seed(seed + 3)
        parts["text_encoder_2"] = _text_encoder(configs["text_encoder_2"], projection=True)
        parts["tokenizer_2"] = _tokenizer(folder / recipe["tokenizer_2"], configs["text_encoder_2"], pad_with_bang=True)
    t5 = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    if t5_name in configs:
        torch.manual_seed(seed + 4)
        parts[t5_name] = _t5_encoder(configs[t5_name], seed + 4)
        parts[t5] = _t5_tokenizer(folder / recipe[t5])
    else:
        parts[t5_name], parts[t5] = None, None
    pipeline_class = recipe.get("pipeline", "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")
    return getattr(diffusers, pipeline_class)(**parts)


def _t5_encoder(config: dict, seed: int):
    """A T5 encoder with random weights; one past streaming.STREAM_BYTES in fp32 (T5-XXL) is built on the meta
    device with its weights drawn one tensor at a time when read (streaming.SeededT5Weights)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from . import streaming

    config = T5Config(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    source = streaming.SeededT5Weights(config, seed)
    if 4 * sum(math.prod(shape) for shape in source.shapes.values()) <= streaming.STREAM_BYTES:
        return T5EncoderModel(config).eval()
    with torch.device("meta"):
        return source.attach(T5EncoderModel(config).eval())


def _t5_tokenizer(tokenizer_dir: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(tokenizer_dir.resolve()))


def _text_encoder(config: dict, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def _tokenizer(tokenizer_dir: Path, text_config: dict, pad_with_bang: bool):
    from transformers import CLIPTokenizer

    tokenizer_dir = tokenizer_dir.resolve()
    pad = {"pad_token": "!"} if pad_with_bang else {}
    return CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"),
        str(tokenizer_dir / "merges.txt"),
        model_max_length=text_config["max_position_embeddings"],
        **pad,
    )


def _scheduler(config: dict):
    import diffusers

    config = dict(config)
    return getattr(diffusers, config.pop("_class_name")).from_config(config)


def recipe_configs(folder: Path, recipe: dict) -> dict[str, dict]:
    """Component configs: inline in the recipe, or read from a diffusers config folder ("configs")."""
    parts = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler")
    if "configs" not in recipe:
        return {k: recipe[k] for k in parts if k in recipe}
    root = (folder / recipe["configs"]).resolve()
    files = {
        "unet": "unet/config.json",
        "transformer": "transformer/config.json",
        "text_encoder_3": "text_encoder_3/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "text_encoder_2": "text_encoder_2/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    }
    return {k: json.loads((root / f).read_text()) for k, f in files.items() if (root / f).is_file()}


def resolve_preset(name: str) -> Path:
    presets = available_presets()
    if name not in presets:
        raise SdexportError(
            f"unknown preset '{name}': choose one of {', '.join(presets) or '(none found)'} (see `sdexport presets`)"
        )
    return presets[name]
