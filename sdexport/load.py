"""Resolve SOURCE (a diffusers folder, a single-file checkpoint, an offline preset or a hub id) to a PyTorch pipeline."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from huggingface_hub import snapshot_download

from . import streaming
from .convert_options import VAE_CLASSES, locate_vae
from .errors import SdexportError
from .families import TRANSFORMER_PIPELINES, index_family, is_sdxl_index
from .presets import build_from_recipe, build_tiny_vae_from_recipe, tiny_vae_presets
from .single_file import load_single_file
from .sources import check_pipeline_folder, locate_source, read_json
from .specs import TINY_VAE_ATTRIBUTE, transformer_family, vae_scale_factor


@dataclass
class Source:
    """A loaded pipeline and where it came from."""

    kind: str  # folder | preset | hub | single_file
    name: str
    pipe: object
    folder: Path | None = None
    loras: list[dict] = field(default_factory=list)
    vae: str = "pipeline"  # or the VAE folder (or tiny-VAE preset) that replaced the pipeline's VAE (replace_vae)
    tiny_vae: str | None = None  # the AutoencoderTiny folder or preset attached for vae_decoder_tiny (attach_tiny_vae)


def _load_folder(folder: Path):
    model_index = read_json(folder / "model_index.json")
    if family := index_family(model_index):
        return _load_transformer_folder(folder, model_index, family)
    if is_sdxl_index(model_index, {}):
        cls = model_index.get("_class_name", "")
        refiner = "Img2Img" in cls or model_index.get("text_encoder", [None])[0] is None
        sdxl = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
        if "Inpaint" in cls:  # keeps its requires_aesthetics_score, which the text-to-image class drops
            sdxl = StableDiffusionXLInpaintPipeline
        return sdxl.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    # an inpainting folder loads as the inpainting class, so the export's model_index names optimum's
    sd = StableDiffusionInpaintPipeline if "Inpaint" in model_index.get("_class_name", "") else StableDiffusionPipeline
    return sd.from_pretrained(
        folder,
        torch_dtype=torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )


def _load_transformer_folder(folder: Path, model_index: dict, family: str):
    """An SD3 or Flux folder, as its own class (image-to-image and inpainting classes keep their name
    for model_index.json); SD3 without text_encoder_3 loads without T5, as diffusers allows."""
    import diffusers

    cls = model_index.get("_class_name", "")
    default = "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"
    pipeline_class = getattr(diffusers, cls if cls in TRANSFORMER_PIPELINES else default)
    absent = {name: None for name, value in model_index.items() if isinstance(value, list) and value[:1] == [None]}
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    streamed = None if t5 in absent else streamed_t5(folder / t5)
    given = {t5: streamed} if streamed is not None else {}
    return pipeline_class.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True, **absent, **given)


def streamed_t5(folder: Path):
    """A saved T5 encoder too large to hold in fp32 (T5-XXL), on the meta device with its weights read from its
    .safetensors files one at a time (streaming.py); None when it fits, or is not in safetensors."""
    from safetensors import safe_open
    from transformers import T5Config, T5EncoderModel

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    elements = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            elements += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    if 4 * elements <= streaming.STREAM_BYTES:
        return None
    with torch.device("meta"):
        model = T5EncoderModel(T5Config.from_pretrained(folder)).eval()
    return streaming.SafetensorsWeights(folder).attach(model)


def load_source(
    source: str, config: str | None = None, prediction_type: str | None = None, allow_pickle: bool = False
) -> Source:
    """Load SOURCE where sources.locate_source finds it. config, prediction_type and allow_pickle apply to
    single-file checkpoints (sdexport/single_file.py)."""
    where = locate_source(source, config, prediction_type, allow_pickle)
    if where.kind == "single_file":
        pipe, _ = load_single_file(where.path, config, prediction_type, allow_pickle)
        return Source(kind="single_file", name=str(where.path.resolve()), pipe=pipe)
    if where.kind == "hub":
        return _load_hub(source)
    if where.kind == "preset" and (where.path / "recipe.json").is_file():
        return Source(kind="preset", name=source, pipe=build_from_recipe(where.path), folder=where.path)
    name = source if where.kind == "preset" else str(where.path.resolve())
    return Source(kind=where.kind, name=name, pipe=_load_folder(where.path), folder=where.path)


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


VAE_MODULES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def load_vae(vae: str, option: str, classes: tuple[str, ...]) -> tuple[object, str]:
    """(the diffusers VAE, where it came from) for `option` (--vae, --tiny-vae): a folder with config.json (or a
    vae/ subfolder with one) of one of `classes`, or a tiny-VAE preset (convert_options.locate_vae)."""
    folder, preset = locate_vae(vae, option, classes)
    if preset is not None:
        return build_tiny_vae_from_recipe(tiny_vae_presets()[preset]), preset
    name = read_json(folder / "config.json").get("_class_name", "AutoencoderKL")
    try:
        module = VAE_MODULES[name].from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SdexportError(f"{option} {vae} could not be loaded ({type(e).__name__}: {e})") from e
    return module.eval(), str(folder.resolve())


def check_vae_fits(pipe, vae, option: str, given: str) -> None:
    """A VAE in place of the pipeline's, or beside it, must read its latents: the same channels and the same
    factor between pixels and latents. SD3's and Flux's 16-channel latents have no tiny VAE here yet."""
    if type(vae).__name__ == "AutoencoderTiny" and transformer_family(pipe):
        raise SdexportError(
            f"{option} {given}: tiny VAEs are supported for SD 1.x/2.x and SDXL exports, not SD3 or Flux yet: "
            "convert without it"
        )
    latent, theirs = pipe.vae.config.latent_channels, vae.config.latent_channels
    if theirs != latent:
        raise SdexportError(
            f"{option} {given} has {theirs} latent channels, the model's VAE {latent}: "
            "choose a VAE made for this model family"
        )
    config = vae.config
    if type(vae).__name__ == "AutoencoderTiny":
        factor = int(config.upsampling_scaling_factor) ** (len(config.num_decoder_blocks) - 1)
    else:
        factor = 2 ** (len(config.block_out_channels) - 1)
    if factor != vae_scale_factor(pipe):
        raise SdexportError(
            f"{option} {given} scales images by {factor}, the model's VAE by {vae_scale_factor(pipe)}: "
            "choose a VAE made for this model family"
        )


def replace_vae(src: Source, vae: str) -> None:
    """Put the diffusers AutoencoderKL (e.g. an fp16-safe SDXL VAE) or AutoencoderTiny (TAESD's family) in
    folder `vae` (or its vae/ subfolder, or a tiny-VAE preset) in place of the pipeline's VAE; its latent space
    must match the U-Net's."""
    module, where = load_vae(vae, "--vae", VAE_CLASSES)
    check_vae_fits(src.pipe, module, "--vae", vae)
    src.pipe.vae = module
    src.pipe.register_modules(vae=src.pipe.vae)
    src.vae = where


def attach_tiny_vae(src: Source, vae: str) -> None:
    """Attach the diffusers AutoencoderTiny in folder `vae` (or a tiny-VAE preset) beside the pipeline's VAE,
    for vae_decoder_tiny (specs.TINY_VAE_ATTRIBUTE); it must read the U-Net's latents."""
    module, where = load_vae(vae, "--tiny-vae", ("AutoencoderTiny",))
    check_vae_fits(src.pipe, module, "--tiny-vae", vae)
    setattr(src.pipe, TINY_VAE_ATTRIBUTE, module)
    src.tiny_vae = where
