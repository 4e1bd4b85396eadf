"""Adapter sets: LoRAs (and other sources of weight changes) applied to an export's graphs when sessions are made.

An `AdapterSet` names what a generation draws with besides the export: LoRA files with their scales, and other
`OverrideSource`s (textual-inversion embeddings, ...). Applying a set computes, for each component it changes,
new values of some graph initializers (lora.py's deltas placed by the manifest's weight map, weight_placement.py)
and, for the text encoders, the tokenizers to use; ONNX Runtime then takes those initializers in place of the
file's (session.Component's `overrides`), so nothing is re-exported and torch is never needed.

`AdapterCache` keeps the sessions of the last few sets (least recently used out first), keyed by each LoRA's
resolved path, modification time, size and scale: switching back to a cached set costs nothing, and an edited
file is read again. The base sessions are the pipeline's own and are never evicted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .lora import ADAPTED, FAMILY_HINT, LoraError, LoraLayer, parse_lora_spec, read_lora
from .manifest import ExportError, Manifest
from .onnx_proto import read_initializers
from .weight_placement import add_to_initializer


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a set: the file (resolved), its scale, and what identifies this version of the file."""

    path: Path
    scale: float
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, spec: object) -> LoraSpec:
        """From "FILE[:SCALE]", a path, (FILE, SCALE) or a LoraSpec; refuses a missing file in one line."""
        if isinstance(spec, LoraSpec):
            return spec
        path, scale = parse_lora_spec(spec)
        if not path.is_file():
            raise LoraError(f"LoRA {path} not found: check the path")
        stat = path.resolve().stat()
        return cls(path.resolve(), scale, stat.st_mtime_ns, stat.st_size)

    @property
    def key(self) -> tuple:
        return (str(self.path), self.mtime_ns, self.size, self.scale)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def short_hash(self) -> str:
        """The file's sha256, first 10 hex digits (as the parameters' Model hash), computed once per version."""
        return _file_sha256(str(self.path), self.mtime_ns, self.size)[:10]


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Changes:
    """What an adapter set changes: new initializer values per component ({component: {initializer name: array}},
    in the graph's dtype) and the tokenizers of text encoders whose vocabulary it changes ({encoder: tokenizer})."""

    initializers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)


class OverrideSource(Protocol):
    """Anything besides LoRAs that changes a set's components (e.g. textual-inversion embeddings): `key` identifies
    it in the cache; `apply` adds its changes, reading the current values through `target.initializers`."""

    @property
    def key(self) -> tuple: ...

    def apply(self, target: AdapterTarget, changes: Changes) -> None: ...


@dataclass(frozen=True)
class AdapterSet:
    """What a generation draws with besides the export: LoRAs (applied in order, their deltas summed), then the
    other sources in order. An empty set draws with the base sessions."""

    loras: tuple[LoraSpec, ...] = ()
    sources: tuple[OverrideSource, ...] = ()

    @classmethod
    def of(cls, loras: object = None, sources: Sequence[OverrideSource] = ()) -> AdapterSet:
        """From a request's `loras`: a list of "FILE[:SCALE]", paths or (FILE, SCALE) pairs, or one of them."""
        if loras is None:
            loras = ()
        elif isinstance(loras, (str, os.PathLike, LoraSpec)):
            loras = (loras,)
        elif not isinstance(loras, (list, tuple)):
            raise LoraError(f"loras must be a list of FILE[:SCALE] strings or (FILE, SCALE) pairs, got {loras!r}")
        return cls(tuple(LoraSpec.of(spec) for spec in loras), tuple(sources))

    @property
    def key(self) -> tuple:
        return (tuple(lora.key for lora in self.loras), tuple(source.key for source in self.sources))

    def __bool__(self) -> bool:
        return bool(self.loras or self.sources)


class AdapterTarget:
    """The export that adapter sets change: its weight maps, its module names, its graphs' base initializers."""

    def __init__(self, manifest: Manifest, tokenizers: Mapping[str, Any] | None = None):
        self.manifest = manifest
        self.folder = Path(manifest.folder)
        self.base_tokenizers = dict(tokenizers or {})

    def weights(self, component: str) -> Mapping[str, Mapping]:
        """The manifest's weight map of a component: {PyTorch weight name: where it sits in the graph}."""
        entry = self.manifest.components.get(component)
        weights = getattr(entry, "weights", None)
        if getattr(entry, "quantization", None) is not None:  # its weights are int8 now: a float delta has no place
            raise LoraError(
                f"this export's {component} is int8-quantized: run-time LoRAs and embeddings need float weights; "
                "fuse the LoRA at export (`sdexport convert --lora FILE --quantize int8`) or export without --quantize"
            )
        if not weights:
            raise ExportError(
                f"{self.folder} records no weight map for its {component} (it predates run-time LoRAs): "
                "re-export it with `sdexport convert`"
            )
        return weights

    @functools.cached_property
    def modules(self) -> dict[str, set[str]]:
        """{component: module names}: each mapped weight's name without `.weight`."""
        return {
            name: {w[: -len(".weight")] for w in self.weights(name) if w.endswith(".weight")}
            for name in ADAPTED
            if self.manifest.has(name)
        }

    @functools.cached_property
    def layers_per_block(self) -> int | None:
        """The U-Net's layers_per_block (unet/config.json), which maps SGM-named LoRAs."""
        config = self.folder / "unet" / "config.json"
        return json.loads(config.read_text()).get("layers_per_block") if config.is_file() else None

    def initializers(self, component: str, names: Sequence[str], changes: Changes) -> dict[str, np.ndarray]:
        """Initializers' current values: as `changes` has them, else the graph's own (read-only, one pass over
        the model file for all of them)."""
        changed = changes.initializers.get(component, {})
        unread = [name for name in names if name not in changed]
        read = read_initializers(self.manifest.model_path(component), unread) if unread else {}
        return {name: changed[name] if name in changed else read[name] for name in names}


def lora_changes(target: AdapterTarget, loras: Sequence[LoraSpec], changes: Changes) -> None:
    """Add the LoRAs' deltas, in order, to the initializers their layers' weights sit in. Every file is read and
    matched first, so that a LoRA that does not fit is refused before any work; each delta is made when added, in
    float32 (as `fuse_lora` adds them one LoRA after another), and each initializer rounded to the graph's dtype once."""
    loaded = [(spec, read_lora(spec.path, target.modules, target.layers_per_block)) for spec in loras]
    for component in ADAPTED:
        layers = [
            (spec, module, layer) for spec, lora in loaded for module, layer in lora.layers.get(component, {}).items()
        ]
        if layers:
            _add_layers(target, component, layers, changes)


def _add_layers(
    target: AdapterTarget, component: str, layers: Sequence[tuple[LoraSpec, str, LoraLayer]], changes: Changes
) -> None:
    weights = target.weights(component)
    for _, module, _ in layers:
        recipe = weights[f"{module}.weight"]
        if recipe.get("initializer") is None:
            raise LoraError(
                f"this export's {component} graph has no initializer for {module}.weight "
                f"({recipe.get('why', 'folded away')}): apply the LoRA at export with `sdexport convert --lora`, "
                "or export with --target generic"
            )
    names = list(dict.fromkeys(weights[f"{module}.weight"]["initializer"] for _, module, _ in layers))
    currents = target.initializers(component, names, changes)
    work: dict[str, np.ndarray] = {}
    scratch = np.empty(max(math.prod(layer.shape) for _, _, layer in layers), np.float32)  # one buffer for every delta
    for spec, module, layer in layers:
        recipe = weights[f"{module}.weight"]
        name = recipe["initializer"]
        value = work[name] if name in work else np.asarray(currents[name], dtype=np.float32)
        delta = layer.delta(spec.scale, scratch, transposed=recipe.get("steps") == [["transpose", [1, 0]]])
        try:  # a float32 copy with the delta added to the weight's block (packed QKV: several blocks, one array)
            work[name] = add_to_initializer(value, recipe, delta)
        except ValueError as e:
            raise LoraError(
                f"LoRA {spec.path} does not fit this export: its {component} {module} is {list(delta.shape)} "
                f"({e}): {FAMILY_HINT}"
            ) from None
    for name, value in work.items():
        changes.initializers.setdefault(component, {})[name] = value.astype(currents[name].dtype, copy=False)


def adapter_changes(target: AdapterTarget, adapters: AdapterSet) -> Changes:
    """Everything a set changes: its LoRAs' deltas, then each other source's changes."""
    changes = Changes()
    if adapters.loras:
        lora_changes(target, adapters.loras, changes)
    for source in adapters.sources:
        source.apply(target, changes)
    return changes


@dataclass
class Adapted:
    """The sessions and tokenizers one set draws with where they differ from the base's."""

    components: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)


class AdapterCache:
    """The sessions of the last `capacity` adapter sets (SessionSettings.adapter_sets), least recently used evicted
    first.

    `create(component, overrides)` makes a session with some initializers replaced (session.Component).
    `sessions_created` counts the sessions made, so that a switch back to a cached set can be seen to make none.
    """

    def __init__(self, target: AdapterTarget, create: Callable[[str, Mapping[str, np.ndarray]], Any], capacity: int):
        self.target = target
        self.create = create
        self.capacity = max(0, int(capacity))
        self.sessions_created = 0
        self._sets: OrderedDict[tuple, Adapted] = OrderedDict()
        self._lock = threading.Lock()  # one set built at a time; a second caller of the same set waits and reuses it

    def get(self, adapters: AdapterSet) -> Adapted:
        """The set's sessions: from the cache, else made now (and cached, evicting the least recently used)."""
        if not adapters:
            return Adapted()
        with self._lock:
            key = adapters.key
            if key in self._sets:
                self._sets.move_to_end(key)
                return self._sets[key]
            changes = adapter_changes(self.target, adapters)
            components = {name: self.create(name, arrays) for name, arrays in changes.initializers.items()}
            self.sessions_created += len(components)
            adapted = Adapted(components, dict(changes.tokenizers))
            if self.capacity:
                self._sets[key] = adapted
                while len(self._sets) > self.capacity:
                    self._sets.popitem(last=False)
            return adapted

    def cached(self) -> list[tuple]:
        """The cached sets' keys, least recently used first."""
        return list(self._sets)
