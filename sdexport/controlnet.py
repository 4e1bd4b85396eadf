"""ControlNets for an export: `--controlnet [NAME=]PATH` parsed and located without torch, each loaded as
diffusers' ControlNetModel, checked against the pipeline's U-Net (its residuals must fit the U-Net's
inputs), and attached to the pipeline, where the "controlnet/NAME" components find it (specs.py).

PATH is a diffusers ControlNetModel folder, a single .safetensors file in the original (LDM) layout
(lllyasviel's ControlNet-v1-1 files: control_model.input_hint_block.*, zero_convs.*, ...; configured from
the pipeline's own U-Net, so it loads where the pipeline is known), a single .safetensors file in diffusers'
layout beside its config.json, or a ControlNet preset (a recipe under models/ whose "kind" is "controlnet":
seeded random weights for tests and benchmarks). A single file's layout is read from its key names only."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdruntime.manifest import controlnet_component

from .errors import SdexportError, first_line
from .presets import controlnet_presets

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LDM_PREFIX = "control_model."
# what every original-layout ControlNet holds, under LDM_PREFIX or without it
LDM_KEYS = (
    "input_blocks.0.0.weight",
    "input_hint_block.0.weight",
    "zero_convs.0.0.weight",
    "middle_block_out.0.weight",
)
DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
FILE_KINDS = ("single_file", "ldm_file")


@dataclass(frozen=True)
class ControlNetSource:
    """One `--controlnet`: its name in the export, and where its weights are."""

    name: str
    kind: str  # folder | single_file (diffusers' layout) | ldm_file (the original layout) | preset
    path: Path

    @property
    def component(self) -> str:
        return controlnet_component(self.name)


def parse_controlnet(text: str) -> ControlNetSource:
    """`[NAME=]PATH` -> where it is; the name defaults to the preset's, the folder's or the file's stem."""
    name, sep, where = text.partition("=")
    if not sep:
        name, where = "", text
    source = locate_controlnet(where)
    name = name or (source.path.stem if source.kind in FILE_KINDS else source.path.name)
    if not NAME_PATTERN.match(name):
        raise SdexportError(
            f"--controlnet {text}: '{name}' is not a usable name; give one of letters, digits, '.', '_' and '-' as NAME=PATH"
        )
    return ControlNetSource(name, source.kind, source.path)


def locate_controlnet(where: str) -> ControlNetSource:
    presets = controlnet_presets()
    if where in presets:
        return ControlNetSource(where, "preset", presets[where])
    path = Path(where).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
            raise SdexportError(
                f"--controlnet {where}: a ControlNet folder holds config.json and {WEIGHT_FILES[0]}; this one does not"
            )
        check_controlnet_config(config, where)
        return ControlNetSource(path.name, "folder", path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SdexportError(f"--controlnet {where}: a single-file ControlNet must be .safetensors")
        kind = single_file_layout(path, where)
        if kind == "single_file" and not (path.parent / "config.json").is_file():
            raise SdexportError(
                f"--controlnet {where}: put the ControlNet's diffusers config.json beside the file "
                "(a diffusers-layout single file carries no config)"
            )
        if kind == "single_file":
            check_controlnet_config(path.parent / "config.json", where)
        return ControlNetSource(path.stem, kind, path)
    choices = ", ".join(presets) or "none"
    raise SdexportError(f"--controlnet {where}: no such folder, file or ControlNet preset (presets: {choices})")


def ldm_part(state: dict) -> dict:
    """The ControlNet's own entries of an original-layout file, without LDM_PREFIX: some files drop the prefix,
    others also hold the whole SD model beside it."""
    if not any(key.startswith(LDM_PREFIX) for key in state):
        return state
    return {key[len(LDM_PREFIX) :]: value for key, value in state.items() if key.startswith(LDM_PREFIX)}


def single_file_layout(path: Path, where: str) -> str:
    """The file's layout, "ldm_file" or "single_file" (diffusers'), from its safetensors header's key names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise SdexportError(f"--controlnet {where} is not a readable safetensors file ({first_line(e)})") from e
    if all(key in ldm_part(dict.fromkeys(keys)) for key in LDM_KEYS):
        return "ldm_file"
    if DIFFUSERS_KEY in keys:
        return "single_file"
    raise SdexportError(
        f"--controlnet {where} is not a ControlNet: a single file needs the original layout's keys "
        f"({LDM_PREFIX}input_hint_block.*, zero_convs.*, middle_block_out.*) or diffusers' ({DIFFUSERS_KEY}, "
        "with config.json beside it)"
    )


def check_controlnet_config(config: Path, where: str) -> None:
    try:
        cls = json.loads(config.read_text()).get("_class_name", "ControlNetModel")
    except (OSError, ValueError) as e:
        raise SdexportError(f"--controlnet {where}: {config} is not readable JSON ({e})") from e
    if cls != "ControlNetModel":
        raise SdexportError(f"--controlnet {where} is a {cls}: pass a diffusers ControlNetModel")


def check_controlnet_sources(texts) -> list[ControlNetSource]:
    """Every `--controlnet`, located, with names that differ."""
    sources = [parse_controlnet(t) for t in texts]
    names = [s.name for s in sources]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise SdexportError(f"two ControlNets are named '{twice}': name them apart, as NAME=PATH")
    return sources


def load_controlnet(source: ControlNetSource, unet_config):
    """diffusers' ControlNetModel in fp32; an original-layout file takes its config from `unet_config`."""
    import torch
    from diffusers import ControlNetModel

    from .presets import build_controlnet_from_recipe

    if source.kind == "preset":
        return build_controlnet_from_recipe(source.path)
    if source.kind == "ldm_file":
        return load_ldm_controlnet(source, unet_config)
    if source.kind == "single_file":
        from safetensors.torch import load_file

        model = ControlNetModel.from_config(ControlNetModel.load_config(source.path.parent))
        missing, unexpected = model.load_state_dict(load_file(source.path), strict=False)
        if missing or unexpected:
            raise SdexportError(
                f"--controlnet {source.path}: its weights do not fit its config.json ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}): pass the diffusers layout"
            )
        return model.float().eval()
    return ControlNetModel.from_pretrained(source.path, torch_dtype=torch.float32, local_files_only=True).eval()


def load_ldm_controlnet(source: ControlNetSource, unet_config):
    """An original-layout file: the config is diffusers' ControlNetModel.from_unet of this U-Net, with the file's
    latent and hint-block channels; the weights are converted by diffusers' own single-file converter and
    loaded strictly."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    state = ldm_part(load_file(source.path))
    conditioning_channels, hint_channels = hint_block_channels(state, source)
    config = {**unet_config, "in_channels": state["input_blocks.0.0.weight"].shape[1]}
    with torch.device("meta"):  # shapes only: the file's weights replace them (assign=True)
        unet = UNet2DConditionModel.from_config(config)
        model = ControlNetModel.from_unet(
            unet,
            load_weights_from_unet=False,
            conditioning_embedding_out_channels=hint_channels,
            conditioning_channels=conditioning_channels,
        )
    weights = convert_ldm_weights(state, model.config)
    check_weights(source, state, weights, model.state_dict())
    model.load_state_dict(weights, strict=True, assign=True)
    return model.float().eval()


def hint_block_channels(state: dict, source: ControlNetSource) -> tuple[int, tuple[int, ...]]:
    """(conditioning_channels, conditioning_embedding_out_channels) from the hint block's convolutions:
    conv_in at 0, then per level a convolution at its width and a stride-2 one to the next (2, 4, ...),
    conv_out last; so each level's width is the output of convolution 0, 4, 8, ..."""
    convs = sorted(
        int(key.split(".")[1]) for key in state if key.startswith("input_hint_block.") and key.endswith(".weight")
    )
    widths = tuple(state[f"input_hint_block.{i}.weight"].shape[0] for i in convs[:-1] if i % 4 == 0)
    if convs != list(range(0, 4 * len(widths) - 1, 2)) or len(widths) > 4:
        raise SdexportError(
            f"--controlnet {source.path}: its input_hint_block has convolutions at {convs}, not a hint block's "
            "0, 2, ..., 14 (at most 4 levels, which diffusers' converter reads): pass an lllyasviel-style ControlNet"
        )
    return state["input_hint_block.0.weight"].shape[1], widths


def convert_ldm_weights(state: dict, config) -> dict:
    """diffusers' single-file converter for ControlNets (convert_controlnet_checkpoint, as
    ControlNetModel.from_single_file uses it), with its two gaps bridged: hint blocks of fewer than 4 levels,
    and SDXL's label_emb (from its own table)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    last = f"input_hint_block.{4 * len(config.conditioning_embedding_out_channels) - 2}."
    # the converter reads the hint block's conv_out at 14, where 4 levels put it: move a smaller one's there
    state = {
        ("input_hint_block.14." + key[len(last) :] if key.startswith(last) else key): v for key, v in state.items()
    }
    weights = convert_controlnet_checkpoint(state, config)
    if config.addition_embed_type == "text_time":  # SDXL's label_emb, which the converter leaves out
        for ours, theirs in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            weights[ours] = state.get(theirs)
    return {key: value for key, value in weights.items() if value is not None}  # the converter .get()s


def check_weights(source: ControlNetSource, state: dict, weights: dict, expected: dict) -> None:
    """Every weight of the file converted to one the model has, of its shape, and none of the model's left out;
    one line otherwise (the model's config came from this U-Net, so a mismatch means another model's ControlNet)."""
    converted = {id(value) for value in weights.values()}
    unexpected = [key for key, value in state.items() if id(value) not in converted]
    unexpected += [key for key in weights if key not in expected]
    missing = [key for key in expected if key not in weights]
    reshaped = [key for key in expected if key in weights and tuple(weights[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or reshaped:
        example = (reshaped or missing or unexpected)[0]
        raise SdexportError(
            f"ControlNet '{source.name}' ({source.path}) is for another model: against this U-Net {len(reshaped)} "
            f"of its weights have other shapes, {len(missing)} are missing, {len(unexpected)} unexpected "
            f"(e.g. {example}); choose one trained for this model"
        )


def check_fits(name: str, controlnet, pipe) -> None:
    """A ControlNet runs beside this pipeline's U-Net only when its residuals fit the U-Net's inputs, it reads
    the same text embeddings and added conditioning, and its control image embedding shrinks pixels to the
    latents' size as the VAE does; one line names the first difference."""
    from .specs import residual_layout, vae_scale_factor

    ours, theirs = pipe.unet.config, controlnet.config
    embedding_factor = 2 ** (len(theirs.conditioning_embedding_out_channels) - 1)
    checks = (
        ("cross_attention_dim", ours.cross_attention_dim, theirs.cross_attention_dim),
        ("addition_embed_type", ours.get("addition_embed_type"), theirs.get("addition_embed_type")),
        ("residuals (block_out_channels, layers_per_block)", residual_layout(ours), residual_layout(theirs)),
        ("control image downscaling", vae_scale_factor(pipe), embedding_factor),
        ("sample channels (in_channels)", pipe.vae.config.latent_channels, theirs.in_channels),
    )
    for what, expected, found in checks:
        if expected != found:
            raise SdexportError(
                f"ControlNet '{name}' is for another model: its {what} is {found}, this U-Net's {expected} "
                "(a ControlNet of another family?); choose one trained for this model"
            )


def attach_controlnets(pipe, sources: list[ControlNetSource], log) -> None:
    """Load each ControlNet, check it against the pipeline's U-Net and attach it for export."""
    models = {}
    for source in sources:
        model = load_controlnet(source, pipe.unet.config)
        check_fits(source.name, model, pipe)
        models[source.component] = model
        log(f"loaded ControlNet '{source.name}' from {source.path}")
    pipe.sdexport_controlnets = models
