"""LoRAs read without torch: which modules of an export a .safetensors LoRA adapts, and by how much.

The formats and rules are diffusers 0.39's (loaders/lora_pipeline.py, lora_conversion_utils.py, utils/peft_utils.py)
and peft's, so that a LoRA applied here changes the weights as `load_lora_weights` + `fuse_lora(lora_scale=s)` does:
W += s * alpha / rank * up @ down (alpha / sqrt(rank) with rsLoRA), per adapted Linear or Conv layer.

- diffusers/peft: `unet.<module>.lora_A.weight`, `.lora_B.weight`, under `unet.`, `text_encoder.`, `text_encoder_2.`;
  alpha and rsLoRA from the file's `lora_adapter_metadata` (peft's LoraConfig per component: lora_alpha,
  alpha_pattern, use_rslora), else alpha = the component's most common rank, as diffusers' get_peft_kwargs sets it.
- older diffusers: `...attn1.processor.to_q_lora.down.weight`, `.lora.down.weight`, `.lora_linear_layer.down.weight`.
- kohya-ss: `lora_unet_<module, dots as _>.lora_down.weight`, `.lora_up.weight`, `.alpha` (absent: the component's
  most common alpha, else its most common rank); `lora_te_` / `lora_te1_` (text_encoder), `lora_te2_`
  (text_encoder_2); LoCon convolutions (down [r, in, k, k], up [out, r, 1, 1]). SDXL files name U-Net blocks
  as SGM's U-Net does (`input_blocks_4_1_...`): mapped to diffusers' blocks as diffusers'
  _maybe_map_sgm_blocks_to_diffusers maps them, with the export's unet/config.json layers_per_block.

A kohya name is matched against the export's own module names (dots as underscores), not rewritten by guesses,
so a name that matches no module is counted and refused rather than dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InvalidArgument
from .safetensors_io import read_safetensors

ADAPTED = ("unet", "text_encoder", "text_encoder_2")  # the components a LoRA adapts
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
KOHYA_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
# diffusers' key endings (peft's and its older ones), longest first so that "_lora.down" is not read as ".down"
DIFFUSERS_ROLES = {
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}
# older diffusers' attention-processor names (`to_q_lora`) -> the module they adapt (state_dict_utils.py)
OLD_UNET_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# LDM (SGM) U-Net names -> diffusers', in kohya's underscored form (lora_conversion_utils._convert_unet_lora_key)
SGM_TOP = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
SGM_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")
DIFFUSERS_BLOCKS = ("down_blocks_", "mid_block_", "up_blocks_")
INNER = ("resnets", "attentions", "upsamplers")  # an SGM block's parts, by their index in it
METADATA_KEY = "lora_adapter_metadata"
FAMILY_HINT = "is it made for another model family (SDXL, SD 2.x vs 1.x)?"


class LoraError(InvalidArgument):
    """A LoRA that cannot be applied to this export; the message says why and what to do."""


def parse_lora_spec(spec: str | os.PathLike | Sequence) -> tuple[Path, float]:
    """ "FILE[:SCALE]" (scale 1.0 by default), a path, or (FILE, SCALE) -> (path, scale), the scale finite."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise LoraError(f"a LoRA is (FILE, SCALE), got {spec!r}")
        path, scale = spec
    elif isinstance(spec, os.PathLike):
        path, scale = spec, 1.0
    else:
        path, scale = str(spec), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a colon in the file name, no scale
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale):
        raise LoraError(
            f"LoRA scale in {spec!r} is not a finite number: write FILE[:SCALE], e.g. style.safetensors:0.8"
        )
    return Path(path).expanduser(), scale


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)], and the alpha its delta is scaled by."""

    down: np.ndarray
    up: np.ndarray
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The adapted weight's PyTorch shape, [out, in(, kh, kw)]."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, scale: float, out: np.ndarray | None = None, transposed: bool = False) -> np.ndarray:
        """(up @ down) * scale * alpha / rank, float32, in the weight's shape (peft's get_delta_weight order).
        `out`, a flat float32 buffer at least that large, holds it instead of a new array: an SD 1.5 LoRA's deltas
        are about 1 GB, and fresh memory costs a page fault per 4 KiB. `transposed` (a Linear layer's) lays it
        out in memory as its transpose, [in, out], as MatMul's weights are: adding it there then reads it in order."""
        rank = self.rank
        factor = np.float32(scale * self.alpha / (math.sqrt(rank) if self.rslora else rank))
        down = self.down.astype(np.float32).reshape(rank, -1)
        up = self.up.astype(np.float32).reshape(self.up.shape[0], rank)
        rows, columns = (down.shape[1], up.shape[0]) if transposed else (up.shape[0], down.shape[1])
        result = None if out is None else out[: rows * columns].reshape(rows, columns)
        result = np.matmul(down.T, up.T, out=result) if transposed else np.matmul(up, down, out=result)
        np.multiply(result, factor, out=result)
        return result.T if transposed else result.reshape(self.shape)


@dataclass
class LoraFile:
    """A LoRA matched to an export: {component: {module name: LoraLayer}}."""

    path: Path
    layers: dict[str, dict[str, LoraLayer]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(modules) for modules in self.layers.values())

    def deltas(self, scale: float) -> dict[str, dict[str, np.ndarray]]:
        """{component: {PyTorch weight name (`<module>.weight`): its delta at `scale`}}."""
        return {
            component: {f"{module}.weight": layer.delta(scale) for module, layer in modules.items()}
            for component, modules in self.layers.items()
        }


@dataclass
class _Raw:
    """A layer as the file names it, before it is matched to a module."""

    component: str
    name: str  # a module name (diffusers formats) or kohya's underscored name
    kohya: bool
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # down, up, alpha


def read_lora(
    path: str | os.PathLike, modules: Mapping[str, Collection[str]], layers_per_block: int | None = None
) -> LoraFile:
    """Read a LoRA and match its layers to `modules` ({component: the export's module names}); refuse in one
    line a file that holds no LoRA, one that is not a plain LoRA, or one whose layers match no module here."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA {path} not found: check the path")
    tensors, metadata = read_safetensors(path)
    raws = _group(path, tensors)
    if not raws:
        found = f"found e.g. '{next(iter(tensors))}'" if tensors else "it is empty"
        raise LoraError(
            f"LoRA {path} has no LoRA weights (no lora_down or lora_A keys; {found}): pass a LoRA for "
            "Stable Diffusion 1.x/2.x or SDXL in diffusers or kohya-ss format"
        )
    _map_sgm_blocks(raws, layers_per_block)
    matched, missed = _match(raws, modules)
    if missed:
        total = len(raws)
        which = (
            f"none of its {total} layers matches a module of this export"
            if missed == total
            else f"{missed} of its {total} layers match no module of this export"
        )
        raise LoraError(f"LoRA {path}: {which}: {FAMILY_HINT}")
    configs = _metadata(path, metadata)
    lora = LoraFile(path)
    for component in ADAPTED:
        found = {module: raw for (c, module), raw in matched.items() if c == component}
        if found:
            lora.layers[component] = _layers(path, found, configs.get(component))
    return lora


def _group(path: Path, tensors: Mapping[str, np.ndarray]) -> list[_Raw]:
    """The file's keys grouped into layers (those with a down matrix); refuses LyCORIS's other kinds and biases."""
    groups: dict[tuple[str, str], _Raw] = {}
    dora = False
    for key in sorted(tensors):  # diffusers reads safetensors' keys sorted; ties in the most common rank follow it
        value = tensors[key]
        parsed = _parse_key(key)
        if parsed is None:
            if key.startswith(tuple(KOHYA_PREFIXES)) and key.endswith(".dora_scale"):
                dora = True
                continue
            if "lora_magnitude_vector" in key:
                raise LoraError(f"LoRA {path} is a DoRA (lora_magnitude_vector): only plain LoRA layers are applied")
            if key.startswith(tuple(KOHYA_PREFIXES)) or key.startswith(tuple(f"{c}." for c in ADAPTED)):
                raise LoraError(
                    f"LoRA {path} holds '{key}', which is not a LoRA matrix (LyCORIS LoHa/LoKr/IA3, or a LoRA "
                    "bias): only LoRA and LoCon layers are applied"
                )
            continue  # not a layer of an adapted component; counted by the caller as no LoRA weights at all
        component, name, kohya, role = parsed
        raw = groups.setdefault((component, name), _Raw(component, name, kohya))
        raw.parts[role] = value
    if dora:  # diffusers drops DoRA's magnitudes with a warning and applies the rest
        warnings.warn(
            f"LoRA {path.name} is a DoRA: its magnitude vectors are ignored, as diffusers ignores them", stacklevel=4
        )
    raws = [raw for raw in groups.values() if "down" in raw.parts]
    for raw in raws:
        if "up" not in raw.parts:
            raise LoraError(f"LoRA {path} has a down matrix for {raw.name} but no up matrix: the file is incomplete")
    return raws


def _parse_key(key: str) -> tuple[str, str, bool, str] | None:
    """(component, layer name, kohya?, role) of a LoRA key, None for any other key."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for ending, role in KOHYA_ROLES.items():
                if key.endswith(ending):
                    return component, key[len(prefix) : -len(ending)], True, role
            return None
    component, _, rest = key.partition(".")
    if component not in ADAPTED:
        return None
    rest = rest.replace(".processor.", ".")
    for ending, role in DIFFUSERS_ROLES.items():
        if rest.endswith(ending):
            name = rest[: -len(ending)]
            if ending.startswith("_lora."):  # older diffusers: attn1.to_q_lora.down.weight
                module, _, old = name.rpartition(".")
                names = OLD_UNET_NAMES if component == "unet" else OLD_TEXT_NAMES
                if old not in names:
                    return None
                name = f"{module}.{names[old]}"
            return component, name, False, role
    return None


def _map_sgm_blocks(raws: list[_Raw], layers_per_block: int | None) -> None:
    """Rename kohya U-Net layers named as SGM's U-Net names them to diffusers' (in place), as diffusers does when
    every U-Net layer uses SGM's block names; with both namings, the SGM ones stay and match nothing."""
    unet = [raw for raw in raws if raw.kohya and raw.component == "unet"]
    sgm = any(raw.name.startswith(SGM_BLOCKS) for raw in unet)
    if not sgm or any(raw.name.startswith(DIFFUSERS_BLOCKS) for raw in unet):
        return
    if layers_per_block is None:
        raise LoraError("this export has no unet/config.json, which mapping an SGM-named LoRA needs: re-export it")
    for raw in unet:
        raw.name = sgm_to_diffusers(raw.name, layers_per_block)


def sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """An SGM (LDM) U-Net layer name in kohya's underscored form -> diffusers', underscored: input_blocks.i.j ->
    down_blocks.b.(resnets|attentions|downsamplers).k, middle_block.i -> mid_block, output_blocks.i.j -> up_blocks,
    as diffusers' _maybe_map_sgm_blocks_to_diffusers and _convert_unet_lora_key rename them."""
    for old, new in SGM_TOP.items():
        if name == old:
            return new
    parts = name.split("_")
    try:
        if name.startswith("input_blocks_"):
            block, layer = divmod(int(parts[2]) - 1, layers_per_block + 1)
            kind, index = ("downsamplers", 0) if parts[4:] == ["op"] else (INNER[int(parts[3])], layer)
            renamed = [
                "down_blocks",
                str(block),
                kind,
                str(index),
                *(["conv"] if kind == "downsamplers" else parts[4:]),
            ]
        elif name.startswith("middle_block_"):
            where = {0: ["resnets", "0"], 1: ["attentions", "0"], 2: ["resnets", "1"]}[int(parts[2])]
            renamed = ["mid_block", *where, *parts[3:]]
        elif name.startswith("output_blocks_"):
            block, layer = divmod(int(parts[2]), layers_per_block + 1)
            inner = int(parts[3])
            renamed = ["up_blocks", str(block), INNER[inner], str(layer if inner < 2 else 0), *parts[4:]]
        else:
            return name
    except (IndexError, ValueError, KeyError):
        return name  # not an SGM block name after all: it matches no module and is counted
    text = "_".join(renamed)
    for old, new in SGM_RESNET.items():
        text = re.sub(rf"_{old}$", f"_{new}", text)
    return text


def _match(raws: list[_Raw], modules: Mapping[str, Collection[str]]) -> tuple[dict[tuple[str, str], _Raw], int]:
    """({(component, module): layer}, how many layers match no module of the export)."""
    underscored = {component: {name.replace(".", "_"): name for name in names} for component, names in modules.items()}
    matched: dict[tuple[str, str], _Raw] = {}
    missed = 0
    for raw in raws:
        names = modules.get(raw.component, ())
        if raw.kohya:
            name = raw.name
            for old, new in SGM_RESNET.items():  # kohya's LoCon names resnet layers as LDM's U-Net does
                name = re.sub(rf"_{old}$", f"_{new}", name)
            module = underscored.get(raw.component, {}).get(name)
        else:
            module = raw.name if raw.name in names else None
        if module is None:
            missed += 1
        else:
            matched[(raw.component, module)] = raw
    return matched, missed


def _metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, dict]:
    """peft's LoraConfig per component from diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": ...})."""
    text = metadata.get(METADATA_KEY)
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except ValueError:
        raise LoraError(f"LoRA {path} has a {METADATA_KEY} that is not JSON: save it again with diffusers") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _layers(path: Path, found: Mapping[str, _Raw], config: Mapping | None) -> dict[str, LoraLayer]:
    """Each module's LoraLayer with its alpha, by diffusers' rules for the component (module docstring)."""
    ranks = Counter(int(raw.parts["up"].shape[1]) for raw in found.values() if raw.parts["up"].ndim >= 2)
    alphas = Counter(float(raw.parts["alpha"].reshape(-1)[0]) for raw in found.values() if "alpha" in raw.parts)
    default = alphas.most_common(1)[0][0] if alphas else (ranks.most_common(1)[0][0] if ranks else 1)
    rslora = False
    patterns: Mapping[str, float] = {}
    if config:
        default = float(config.get("lora_alpha", default))
        patterns = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora"))
        if config.get("use_dora"):
            raise LoraError(f"LoRA {path} is a DoRA (use_dora): only plain LoRA layers are applied")
    layers = {}
    for module, raw in found.items():
        down, up = raw.parts["down"], raw.parts["up"]
        fits = down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
        if not fits or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise LoraError(
                f"LoRA {path}: the matrices of {module} do not fit together (down {list(down.shape)}, up "
                f"{list(up.shape)}): the file is damaged or not a LoRA"
            )
        alpha = float(raw.parts["alpha"].reshape(-1)[0]) if "alpha" in raw.parts else default
        for pattern, value in patterns.items():  # peft's get_pattern_key
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        layers[module] = LoraLayer(down, up, alpha, rslora)
    return layers
