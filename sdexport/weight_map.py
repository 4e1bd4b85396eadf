"""The weight map: where each PyTorch weight of a U-Net family's `unet`, `text_encoder` and `text_encoder_2`
went in the written graph, recorded in the manifest for run-time LoRA and textual inversion.

Found by value, not by name: ONNX Runtime's passes rename, transpose, block and pack weights per target. While
a component is traced, each Linear and Conv weight and the token-embedding table leave a sample (shape and
SAMPLES values at spread positions, sample_weights); once the final graph is written, each sample is looked
for in its initializers, indexed by shape, under every known layout (candidate_layouts), and the first
layout whose positions hold the sampled values wins: exactly in fp32 graphs, within float16 rounding in
fp16 ones. The recipe format and its application are sdruntime.weight_placement's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sdruntime.onnx_proto import initializer_table, read_initializers

from .specs import spec_of, transformer_family
from .streaming import is_streamed

MAPPED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SAMPLES = 64  # values compared per weight: a false match needs all of them to agree
NCHWC_BLOCKS = (8, 16, 4, 32)  # MLAS's NCHWc block (8 on AVX2, 16 on AVX-512): told by the values, never assumed
FLOAT_TYPES = (1, 10)  # ONNX float32, float16
NOT_FOUND = "no initializer holds its values in a known layout: an optimization folded or changed it"


@dataclass(frozen=True)
class WeightSample:
    """A PyTorch weight's shape and its values at a few flat positions (the whole weight when small)."""

    shape: tuple[int, ...]
    positions: np.ndarray
    values: np.ndarray


def mapped_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights the map lists: every Linear and Conv weight and the token-embedding table."""
    for name, child in module.named_modules():
        mapped = isinstance(child, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        if mapped or (isinstance(child, torch.nn.Embedding) and name.endswith("token_embedding")):
            yield f"{name}.weight", child.weight


def sample_of(weight: torch.Tensor, seed: int = 0) -> WeightSample:
    count = weight.numel()
    if count <= SAMPLES:
        positions = np.arange(count, dtype=np.int64)
    else:  # the first and last values and random ones between, the same for every run
        between = np.random.default_rng(seed).choice(count - 2, SAMPLES - 2, replace=False) + 1
        positions = np.sort(np.concatenate([[0, count - 1], between])).astype(np.int64)
    values = weight.detach().reshape(-1)[torch.from_numpy(positions)].float().cpu().numpy()
    return WeightSample(tuple(weight.shape), positions, values)


def sample_weights(component: str, pipe) -> dict[str, WeightSample] | None:
    """The samples of a component the map covers (U-Net families' U-Net and CLIP text encoders), taken
    while its PyTorch weights are held; None for other components."""
    if component not in MAPPED_COMPONENTS or transformer_family(pipe) or getattr(pipe, component, None) is None:
        return None
    module = spec_of(component).module_of(pipe, component)
    if is_streamed(module):  # its weights are read from their source one at a time (streaming.py)
        return None
    with torch.no_grad():
        return {name: sample_of(weight, i) for i, (name, weight) in enumerate(mapped_parameters(module))}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _packed_layouts(shape: tuple[int, ...]) -> Iterator[tuple[dict, tuple[int, ...]]]:
    """A Linear weight [out, in] as one of 2 or 3 packed MatMul weights [in, parts * out] (the cuda target's
    Attention / MultiHeadAttention): concatenated (one head) or interleaved per head, as ORT packs them."""
    out, cin = shape
    for parts in (3, 2):
        for heads in _divisors(out):
            for role in range(parts):
                if heads == 1:
                    entry = {"steps": [["transpose", [1, 0]]], "view": [cin, parts, out], "at": [None, role, None]}
                else:
                    steps = [["transpose", [1, 0]], ["reshape", [cin, heads, out // heads]]]
                    view = [cin, heads, parts, out // heads]
                    entry = {"steps": steps, "view": view, "at": [None, None, role, None]}
                yield entry, (cin, parts * out)


def _nchwc_layouts(shape: tuple[int, ...]) -> Iterator[tuple[dict, tuple[int, ...]]]:
    """A Conv2d filter as ORT's NCHWc transformer stores it (MLAS ReorderFilterOIHWBiBo, or OIHWBo when the
    input has fewer channels than a block), output channels zero-padded to the block, for each block size."""
    out, cin, kh, kw = shape
    for block in NCHWC_BLOCKS:
        padded = -(-out // block) * block
        pad = [["pad", [[0, padded - out], [0, 0], [0, 0], [0, 0]]]] if padded != out else []
        if cin < block:
            steps = pad + [["reshape", [padded // block, block, cin, kh, kw]], ["transpose", [0, 2, 3, 4, 1]]]
            yield {"steps": steps, "view": [padded // block, cin, kh, kw, block]}, (padded, cin, kh, kw)
        if cin % block == 0:
            blocks = [padded // block, block, cin // block, block, kh, kw]
            steps = pad + [["reshape", blocks], ["transpose", [0, 2, 4, 5, 3, 1]]]
            view = [padded // block, cin // block, kh, kw, block, block]
            yield {"steps": steps, "view": view}, (padded, cin, kh, kw)


def candidate_layouts(shape: tuple[int, ...]) -> Iterator[tuple[dict, tuple[int, ...]]]:
    """(recipe without its initializer, the initializer shape it needs) for every layout a weight of this
    shape may have in a written graph, the plain ones first."""
    yield {}, shape  # Conv, Gemm (transB), Gather
    if len(shape) == 2:
        yield {"steps": [["transpose", [1, 0]]]}, shape[::-1]  # MatMul
        yield from _packed_layouts(shape)
    elif len(shape) == 4:
        yield {"steps": [["transpose", [0, 2, 3, 1]]]}, (shape[0], *shape[2:], shape[1])  # NhwcConv: OHWI
        yield from _nchwc_layouts(shape)


def block_positions(sample: WeightSample, entry: Mapping, shape: tuple[int, ...]) -> np.ndarray | None:
    """The flat positions in an initializer of `shape` that the sampled positions go to under the recipe
    (its steps applied to coordinates, not values); None when the recipe does not fit."""
    coords, current = np.array(np.unravel_index(sample.positions, sample.shape)), tuple(sample.shape)
    for op, argument in entry.get("steps", ()):
        if op == "transpose":
            coords, current = coords[list(argument)], tuple(current[a] for a in argument)
        elif op == "reshape":
            if int(np.prod(argument)) != int(np.prod(current)):
                return None
            coords = np.array(np.unravel_index(np.ravel_multi_index(tuple(coords), current), argument))
            current = tuple(argument)
        else:  # pad: zeros before and after each axis
            coords = coords + np.array([before for before, _ in argument])[:, None]
            current = tuple(s + before + after for s, (before, after) in zip(current, argument))
    view = tuple(entry.get("view", shape))
    at = entry.get("at", [None] * len(view))
    axes, full = iter(range(len(current))), []
    for size, a in zip(view, at):
        if isinstance(a, int):
            full.append(np.full(len(sample.positions), a))
            continue
        axis = next(axes, None)
        start, stop = (0, size) if a is None else a
        if axis is None or current[axis] != stop - start:
            return None
        full.append(coords[axis] + start)
    if next(axes, None) is not None or int(np.prod(view)) != int(np.prod(shape)):
        return None
    return np.ravel_multi_index(tuple(full), view)


def as_float16(graph: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which float16 values are the float32 `values` rounded: within half a unit in the last place (2**-25 among
    subnormals), or float16's smallest subnormal of the same sign for a magnitude below it (the fp16 pass clamps
    those rather than flushing them to zero)."""
    graph = graph.astype(np.float32)
    magnitude = np.abs(values)
    rounded = np.abs(graph - values) <= np.maximum(magnitude * 2.0**-11, 2.0**-25) * (1 + 2.0**-20)
    clamped = (magnitude > 0) & (magnitude < 2.0**-24) & (graph == np.sign(values) * 2.0**-24)
    return rounded | clamped


def holds(flat: np.ndarray, positions: np.ndarray, values: np.ndarray) -> bool:
    """Whether the initializer holds the sampled values there: exactly for float32, as float16 rounds them
    (as_float16) for float16. The first value is compared alone first: most candidates fail there."""
    first = positions[:1]
    if flat.dtype == np.float32:
        return bool(flat[first][0] == values[0]) and np.array_equal(flat[positions], values)
    return bool(as_float16(flat[first], values[:1])[0]) and bool(np.all(as_float16(flat[positions], values)))


class InitializerIndex:
    """The written graph's float initializers of two or more dimensions, by shape, memory-mapped."""

    def __init__(self, model_path: Path):
        table = initializer_table(model_path)
        names = [n for n, i in table.items() if i.data_type in FLOAT_TYPES and len(i.dims) >= 2]
        arrays = read_initializers(model_path, names)
        self.flat = {name: array.reshape(-1) for name, array in arrays.items()}
        self.by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
        self.by_suffix: dict[str, str] = {}
        for name, array in arrays.items():
            self.by_shape[array.shape].append(name)
            # the exporter's wrappers prefix the module's own names ("unet.conv_in.weight")
            self.by_suffix.setdefault(name.split(".", 1)[-1], name)
            self.by_suffix.setdefault(name, name)

    def places(self, name: str, sample: WeightSample) -> list[dict]:
        """Every (initializer, layout) whose values match the sample, the one named like it first."""
        found = []
        for layout, shape in candidate_layouts(sample.shape):
            candidates = self.by_shape.get(shape, [])
            if not candidates:
                continue
            positions = block_positions(sample, layout, shape)
            if positions is None:
                continue
            named = self.by_suffix.get(name)
            for initializer in sorted(candidates, key=lambda n: n != named):
                if holds(self.flat[initializer], positions, sample.values):
                    found.append({"initializer": initializer, **layout})
        return found


def _block_key(entry: Mapping) -> str:
    return json.dumps([entry["initializer"], entry.get("view"), entry.get("at")])


def map_weights(model_path: Path, samples: Mapping[str, WeightSample]) -> dict[str, dict]:
    """The manifest's `weights` of one written component: each sampled weight's recipe, or
    {"initializer": None, "why": ...} when its place cannot be told."""
    index = InitializerIndex(model_path)
    weights, owners = {}, defaultdict(list)
    for name, sample in samples.items():
        weights[name] = place_weight(index, name, sample)
        if weights[name]["initializer"] is not None:
            owners[_block_key(weights[name])].append(name)
    for names in owners.values():
        if len(names) > 1:  # equal weights that the graph keeps once (torch de-duplicates equal initializers)
            for name in names:
                others = ", ".join(n for n in names if n != name)
                weights[name] = {"initializer": None, "why": f"the graph holds it once with {others} (equal values)"}
    return weights


def place_weight(index: InitializerIndex, name: str, sample: WeightSample) -> dict:
    """One weight's recipe: its unique place, or a reason why it has none."""
    if sample.values.size > 1 and np.all(sample.values == sample.values[0]):
        named = index.by_suffix.get(name)
        plain = [p for p in index.places(name, sample) if p["initializer"] == named and len(p) == 1]
        if plain:  # a constant weight is told by its name where the graph kept it
            return plain[0]
        return {"initializer": None, "why": "its values are all equal, so its place cannot be told by value"}
    places = index.places(name, sample)
    if not places:
        return {"initializer": None, "why": NOT_FOUND}
    if len({p["initializer"] for p in places}) > 1:
        where = ", ".join(sorted({p["initializer"] for p in places}))
        return {"initializer": None, "why": f"its values are in more than one initializer ({where})"}
    if len({json.dumps(p) for p in places}) > 1:
        return {"initializer": None, "why": f"more than one layout of {places[0]['initializer']} fits its values"}
    return places[0]
