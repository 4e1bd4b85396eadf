"""ControlNets for an export: `--controlnet [NAME=]PATH` parsed and located without torch, each loaded as
diffusers' ControlNetModel, checked against the pipeline's U-Net (its residuals must fit the U-Net's
inputs), and attached to the pipeline, where the "controlnet/NAME" components find it (specs.py).

PATH is a diffusers ControlNetModel folder, a single .safetensors file beside a config.json (diffusers'
own layout, or --config-style: the folder of the file holds config.json), or a ControlNet preset (a
recipe under models/ whose "kind" is "controlnet": seeded random weights for tests and benchmarks)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdruntime.manifest import controlnet_component

from .errors import SdexportError
from .presets import controlnet_presets

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class ControlNetSource:
    """One `--controlnet`: its name in the export, and where its weights are."""

    name: str
    kind: str  # folder | single_file | preset
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
    name = name or (source.path.stem if source.kind == "single_file" else source.path.name)
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
        if not (path.parent / "config.json").is_file():
            raise SdexportError(
                f"--controlnet {where}: put the ControlNet's diffusers config.json beside the file "
                "(single files carry no config)"
            )
        check_controlnet_config(path.parent / "config.json", where)
        return ControlNetSource(path.stem, "single_file", path)
    choices = ", ".join(presets) or "none"
    raise SdexportError(f"--controlnet {where}: no such folder, file or ControlNet preset (presets: {choices})")


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


def load_controlnet(source: ControlNetSource):
    """diffusers' ControlNetModel in fp32."""
    import torch
    from diffusers import ControlNetModel

    from .presets import build_controlnet_from_recipe

    if source.kind == "preset":
        return build_controlnet_from_recipe(source.path)
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
        model = load_controlnet(source)
        check_fits(source.name, model, pipe)
        models[source.component] = model
        log(f"loaded ControlNet '{source.name}' from {source.path}")
    pipe.sdexport_controlnets = models
