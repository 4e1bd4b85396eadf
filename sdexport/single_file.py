"""Single-file SD 1.x / 2.x / SDXL checkpoints in the original (LDM / SGM) layout: detect the family
from the key names, refuse what we do not convert, and load offline with diffusers and configs
shipped in `models/`. A 9-channel U-Net (SD 1.5-inpainting, SD 2's 512-inpainting) loads as
StableDiffusionInpaintPipeline with the shipped inpainting configs, as diffusers' `from_single_file` does.

Our own detection, because diffusers' `infer_diffusers_model_type` answers "v1" for keys it does not
know. Detection reads only key names and shapes (safetensors headers), never the weights.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import Counter
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from transformers import CLIPTokenizer

from .errors import SdexportError, first_line
from .families import check_supported
from .presets import models_dir
from .sources import read_json

UNET = "model.diffusion_model."
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
SDXL_CLIP = "conditioner.embedders.0.transformer."  # SDXL: transformers' CLIPTextModel (ViT-L)
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."  # SDXL: OpenCLIP bigG, with its text projection
REFINER_OPEN_CLIP = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP bigG alone
CONV_IN = UNET + "input_blocks.0.0.weight"
SHIPPED_CONFIGS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
SHIPPED_INPAINTING_CONFIGS = {"sd1": "sd15-inpainting", "sd2": "sd2-inpainting"}
INPAINTING_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent channels
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
SDXL_CONFIG_FILES = (*CONFIG_FILES, "text_encoder_2/config.json")
# Where each family keeps its text encoders' token embeddings: {config subfolder: key}
TOKEN_EMBEDDINGS = {
    "sd1": {"text_encoder": CLIP + "text_model.embeddings.token_embedding.weight"},
    "sd2": {"text_encoder": OPEN_CLIP + "token_embedding.weight"},
    "sdxl": {
        "text_encoder": SDXL_CLIP + "text_model.embeddings.token_embedding.weight",
        "text_encoder_2": SDXL_OPEN_CLIP + "token_embedding.weight",
    },
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction")
EXPECTED = (
    f"expected the original (LDM) layout: {UNET}*, {VAE}* and {CLIP}* (SD 1.x), {OPEN_CLIP}* (SD 2.x) "
    f"or {SDXL_CLIP}* with {SDXL_OPEN_CLIP}* (SDXL)"
)


def read_shapes(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape. safetensors: from the header only; a pickle only with allow_pickle, tensors only."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise SdexportError(f"{path} is not a readable safetensors file ({first_line(e)}): is it complete?") from e
    if suffix not in PICKLE_SUFFIXES:
        raise SdexportError(
            f"{path} is a file sdexport does not read: pass a .safetensors checkpoint (or a .ckpt with "
            "--allow-pickle), a diffusers folder or a preset"
        )
    if not allow_pickle:
        raise SdexportError(
            f"{path} is a pickle checkpoint ({suffix}), which can run code when loaded: pass --allow-pickle to "
            "load it with torch.load(weights_only=True), or use a .safetensors version of the model"
        )
    state = load_pickle(path)
    return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}


def load_pickle(path: Path) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects."""

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"an object of type {found.group(1)}" if found else first_line(e)
        raise SdexportError(
            f"{path} pickles more than tensors ({what}; often training callbacks), which torch.load(weights_only=True) "
            "refuses to run: in an environment you trust, load it with weights_only=False and save its state_dict "
            "with safetensors.torch.save_file, then convert the .safetensors file"
        ) from e
    except Exception as e:  # truncated or not a torch file: torch raises RuntimeError, EOFError, ...
        raise SdexportError(f"{path} could not be read by torch.load ({first_line(e)}): is the file complete?") from e
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning checkpoints keep the weights one level down
    if not isinstance(state, dict):
        raise SdexportError(f"{path} holds a {type(state).__name__}, not a state dict: {EXPECTED}")
    return state


def checkpoint_family(shapes: dict[str, tuple[int, ...]], where: str) -> str:
    """sd1, sd2 or sdxl from the key names, or a one-line refusal that names what was found and expected."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    if has(REFINER_OPEN_CLIP):
        raise SdexportError(
            f"{where} is an SDXL refiner checkpoint ({REFINER_OPEN_CLIP}* keys): refiner single files are not "
            "supported yet; save it as a diffusers folder (StableDiffusionXLImg2ImgPipeline.from_single_file, "
            "then save_pretrained) and convert that"
        )
    if has("control_model.") or has("controlnet_cond_embedding.") or has("input_hint_block."):
        raise SdexportError(
            f"{where} is a ControlNet checkpoint (control_model.* keys), not a pipeline: pass a base model as "
            "SOURCE and this file with --controlnet (or `sdexport add-controlnet OUT FILE`)"
        )
    if has("lora_unet_") or has("lora_te_") or any(".lora_" in key or ".lora." in key for key in shapes):
        raise SdexportError(f"{where} is a LoRA, not a model: pass a base model as SOURCE and the LoRA with --lora")
    if CONV_IN not in shapes:
        raise SdexportError(
            f"{where} does not look like a Stable Diffusion 1.x/2.x checkpoint: {EXPECTED}; found {_summary(shapes)}"
        )
    channels = shapes[CONV_IN][1]
    if channels not in (4, INPAINTING_CHANNELS):
        raise SdexportError(
            f"{where} has a U-Net with {channels} input channels (instruct-pix2pix has 8, the x4 "
            "upscaler 7): only 4-channel text-to-image and 9-channel inpainting U-Nets are supported"
        )
    if not has(VAE):
        raise SdexportError(f"{where} has no VAE weights ({VAE}* keys): only complete checkpoints are supported")
    if has(SDXL_CLIP) or has(SDXL_OPEN_CLIP):
        missing = next((p for p in (SDXL_CLIP, SDXL_OPEN_CLIP) if not has(p)), None)
        if missing:
            raise SdexportError(
                f"{where} is an SDXL checkpoint without its {'second' if missing == SDXL_OPEN_CLIP else 'first'} "
                f"text encoder ({missing}* keys): only complete checkpoints are supported"
            )
        if channels == INPAINTING_CHANNELS:
            raise SdexportError(
                f"{where} is an SDXL inpainting checkpoint (9-channel U-Net): SDXL inpainting is not supported yet"
            )
        return "sdxl"
    if has(CLIP):
        return "sd1"
    if has(OPEN_CLIP):
        return "sd2"
    raise SdexportError(
        f"{where} has no text encoder weights: expected {CLIP}* (SD 1.x CLIP), {OPEN_CLIP}* "
        f"(SD 2.x OpenCLIP) or {SDXL_CLIP}* with {SDXL_OPEN_CLIP}* (SDXL); found {_summary(shapes)}"
    )


def is_inpainting(shapes: dict[str, tuple[int, ...]]) -> bool:
    """A 9-channel U-Net takes the mask and the masked image's latents beside the noisy latents."""
    return shapes[CONV_IN][1] == INPAINTING_CHANNELS


def config_folder(family: str, config: str | None, inpainting: bool = False) -> Path:
    """The diffusers configs to build the pipeline from: --config DIR, or the ones shipped for the family."""

    if config is None:
        shipped = SHIPPED_INPAINTING_CONFIGS if inpainting else SHIPPED_CONFIGS
        folder = models_dir() / "configs" / shipped[family]
        where = f"the shipped configs ({folder})"
    else:
        folder = Path(config).expanduser()
        where = f"--config {folder}"
        if not folder.is_dir():
            raise SdexportError(
                f"{where} is not a folder: pass a diffusers pipeline folder (model_index.json and "
                "the unet, vae, text_encoder and scheduler configs)"
            )
    for name in SDXL_CONFIG_FILES if family == "sdxl" else CONFIG_FILES:
        if not (folder / name).is_file():
            raise SdexportError(f"{where} has no {name}: pass a diffusers pipeline folder (`save_pretrained` output)")
    index = _read_json(folder / "model_index.json")
    check_supported(index, _read_json(folder / "unet" / "config.json"), where)
    if ("text_encoder_2" in index) != (family == "sdxl"):
        what = (
            "an SDXL pipeline"
            if family != "sdxl"
            else f"a {index.get('_class_name', 'pipeline')} without text_encoder_2"
        )
        raise SdexportError(
            f"{where} holds {what}, but the checkpoint is {FAMILY_NAMES[family]}: pass --config with this model's "
            "diffusers configs"
        )
    return folder


def check_fits(shapes: dict[str, tuple[int, ...]], family: str, folder: Path, custom: bool) -> None:
    """Compare a few widths of the checkpoint with the configs before building anything."""
    unet = _read_json(folder / "unet" / "config.json")
    cross = next((s for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    widths = [
        ("U-Net's input (9 channels to inpaint, else 4)", shapes[CONV_IN][1], unet.get("in_channels", 4)),
        ("U-Net's first block", shapes[CONV_IN][0], unet.get("block_out_channels", [None])[0]),
    ]
    for subfolder, token in TOKEN_EMBEDDINGS[family].items():
        text = _read_json(folder / subfolder / "config.json")
        found = shapes[token][-1] if token in shapes else None
        widths.append((subfolder.replace("_", " "), found, text.get("hidden_size")))
    widths.append(("cross-attention input", cross[-1] if cross else None, unet.get("cross_attention_dim")))
    for what, found, configured in widths:
        if found is not None and configured is not None and found != configured:
            where = f"--config {folder}" if custom else f"the shipped {family} configs ({folder})"
            raise SdexportError(
                f"the checkpoint does not fit {where}: its {what} is {found} wide, the config says "
                f"{configured}: pass --config with this model's diffusers configs"
            )


def load_single_file(
    path: Path, config: str | None = None, prediction_type: str | None = None, allow_pickle: bool = False
):
    """Detect, check and load a single-file checkpoint; returns (pipeline, family)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise SdexportError(f"unknown prediction type '{prediction_type}': choose epsilon or v_prediction")
    shapes = read_shapes(path, allow_pickle)
    family = checkpoint_family(shapes, str(path))
    inpainting = is_inpainting(shapes)
    folder = config_folder(family, config, inpainting)
    check_fits(shapes, family, folder, custom=config is not None)
    del shapes  # diffusers reads the file itself (a pickle again with torch.load(weights_only=True), mmapped)
    pipe = _from_single_file(path, folder, family, prediction_type, inpainting)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2")[: 4 if family == "sdxl" else 3]:
        missing = [n for n, p in getattr(pipe, name).named_parameters() if p.is_meta]
        if missing:
            raise SdexportError(
                f"{path} lacks weights that the configs in {folder} call for ({len(missing)} of the "
                f"{name}, e.g. {missing[0]}): the checkpoint is incomplete or for another model; "
                "pass --config with its configs"
            )
    return pipe, family


def _from_single_file(path: Path, folder: Path, family: str, prediction_type: str | None, inpainting: bool):
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its dtype and unused-key warnings are noise here; we check ourselves
    common = {
        "config": str(folder),
        "local_files_only": True,
        "torch_dtype": torch.float32,
        "scheduler": scheduler(folder, prediction_type),
    }
    try:
        if family == "sdxl":  # SDXL's second tokenizer pads with "!" (id 0), as OpenCLIP's does
            return StableDiffusionXLPipeline.from_single_file(
                str(path),
                tokenizer=clip_tokenizer("sd1", folder),
                tokenizer_2=clip_tokenizer("sd2", folder, "text_encoder_2"),
                **common,
            )
        sd = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        return sd.from_single_file(
            str(path),
            tokenizer=clip_tokenizer(family, folder),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **common,
        )
    except (
        ValueError,
        RuntimeError,
        KeyError,
        OSError,
        diffusers.loaders.single_file_utils.SingleFileComponentError,
    ) as e:
        if "meta tensor" in str(e):  # diffusers leaves the parameters it found no weights for on the meta device
            raise SdexportError(
                f"{path} lacks weights that the configs in {folder} call for: the checkpoint is "
                "incomplete or for another model; pass --config with its configs"
            ) from e
        raise SdexportError(
            f"{path} could not be loaded with the configs in {folder} ({first_line(e)}): "
            "pass --config with this model's diffusers configs"
        ) from e
    finally:
        diffusers_logging.set_verbosity(verbosity)


def clip_tokenizer(family: str, folder: Path, encoder: str = "text_encoder"):
    """The real CLIP tokenizer shipped in models/; SD 2.x pads with "!" (id 0), SD 1.x with <|endoftext|>."""

    tokenizer_dir = models_dir() / "clip-tokenizer"
    length = _read_json(folder / encoder / "config.json").get("max_position_embeddings", 77)
    pad = {"pad_token": "!"} if family == "sd2" else {}
    return CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=length, **pad
    )


def scheduler(folder: Path, prediction_type: str | None):
    """The config folder's scheduler, with --prediction-type replacing its prediction type."""

    config = _read_json(folder / "scheduler" / "scheduler_config.json")
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise SdexportError(f"{folder}/scheduler has an unknown scheduler class '{config.get('_class_name')}'")
    override = {"prediction_type": prediction_type} if prediction_type else {}
    return cls.from_config(config, **override)


def _read_json(path: Path) -> dict:
    return read_json(path, "pass a diffusers pipeline folder as --config")


def _summary(shapes: dict) -> str:
    """The most common key prefixes, e.g. "down_blocks.* (120 keys), up_blocks.* (150 keys)"."""
    if not shapes:
        return "no tensors at all"
    counts = Counter(
        ".".join(key.split(".")[:2]) if key.startswith(("model.", "cond_stage_model.")) else key.split(".")[0]
        for key in shapes
    )
    return ", ".join(f"{prefix}.* ({n} key{'s' if n > 1 else ''})" for prefix, n in counts.most_common(3))
