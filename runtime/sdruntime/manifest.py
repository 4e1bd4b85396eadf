"""The exported folder's contract: the component IO table and the manifest `sdexport.json`.

The exporter writes what this module describes and the runtime reads it back; neither repeats the
IO table. Torch-free: only the standard library and NumPy-free JSON handling.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

MANIFEST_NAME = "sdexport.json"
FORMAT_VERSION = 1
# Version 2 adds `cpu_layout_probe`: a runtime that reads version 1 only would load such graphs
# without checking that this CPU reads their layout, so those exports are marked 2 and it refuses them.
CPU_LAYOUT_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, CPU_LAYOUT_FORMAT_VERSION)
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

DTYPES = ("fp32", "fp16")
TARGETS = ("generic", "cpu", "cuda", "tensorrt")
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


class ExportError(UserError):
    """A folder that is not a usable export; the message is one line that says what to do."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. `dtype` "float" follows the export's dtype; others are fixed.

    Shape entries are symbolic names: the ones in DYNAMIC_AXES vary at run time unless the export
    is static; the others are resolved from the model's config when the manifest is written.
    """

    name: str
    dtype: str
    shape: tuple[str, ...]


@dataclass(frozen=True)
class ComponentIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


DYNAMIC_AXES = ("batch", "sequence", "height", "width", "image_height", "image_width")

COMPONENT_IO: dict[str, ComponentIO] = {
    "text_encoder": ComponentIO(
        inputs=(TensorSpec("input_ids", "int64", ("batch", "max_length")),),
        outputs=(
            TensorSpec("last_hidden_state", "float", ("batch", "max_length", "text_hidden_size")),
            TensorSpec("pooler_output", "float", ("batch", "text_hidden_size")),
        ),
    ),
    "unet": ComponentIO(
        inputs=(
            TensorSpec("sample", "float", ("batch", "latent_channels", "height", "width")),
            # float32 in every export: fp16 cannot hold timesteps such as 957.375
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float", ("batch", "sequence", "cross_attention_dim")),
        ),
        outputs=(TensorSpec("out_sample", "float", ("batch", "out_channels", "height", "width")),),
    ),
    "vae_decoder": ComponentIO(
        inputs=(TensorSpec("latent_sample", "float", ("batch", "latent_channels", "height", "width")),),
        outputs=(TensorSpec("sample", "float", ("batch", "image_channels", "image_height", "image_width")),),
    ),
    "vae_encoder": ComponentIO(
        inputs=(TensorSpec("sample", "float", ("batch", "image_channels", "image_height", "image_width")),),
        outputs=(
            TensorSpec("latent_parameters", "float", ("batch", "latent_parameters", "height", "width")),
        ),
    ),
}


def resolve_dtype(spec_dtype: str, export_dtype: str) -> str:
    """The ONNX element type of a tensor: "float" follows the export, the others are fixed."""
    if spec_dtype == "float":
        return "float16" if export_dtype == "fp16" else "float32"
    return spec_dtype


def resolve_shape(shape: tuple[str, ...], dims: dict[str, int]) -> list[int | str]:
    """Replace the names that `dims` fixes by numbers; the rest stay symbolic."""
    return [dims.get(axis, axis) for axis in shape]


FINAL_LAYER_NORM = "text_encoder/final_layer_norm.npz"


def component_io(component: str, num_hidden_states: int = 0) -> ComponentIO:
    """The IO table's entry; the text encoder also outputs `hidden_states.{i}` (optimum's names)
    for i < num_hidden_states: the embeddings and each layer's output, for clip_skip."""
    io = COMPONENT_IO[component]
    if component != "text_encoder" or not num_hidden_states:
        return io
    shape = ("batch", "max_length", "text_hidden_size")
    hidden = tuple(TensorSpec(f"hidden_states.{i}", "float", shape) for i in range(num_hidden_states))
    return ComponentIO(io.inputs, io.outputs + hidden)


def describe_io(component: str, export_dtype: str, dims: dict[str, int], num_hidden_states: int = 0) -> dict[str, list[dict]]:
    """The manifest's `inputs` and `outputs` entries of one component."""
    io = component_io(component, num_hidden_states)

    def entry(spec: TensorSpec) -> dict:
        return {
            "name": spec.name,
            "dtype": resolve_dtype(spec.dtype, export_dtype),
            "shape": resolve_shape(spec.shape, dims),
        }

    return {"inputs": [entry(s) for s in io.inputs], "outputs": [entry(s) for s in io.outputs]}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(folder: Path, relative: str) -> dict:
    path = folder / relative
    return {"path": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# The files beside the graphs that change what the runtime computes: hashed into `config_files`.
CONFIG_FILES = ("tokenizer/tokenizer.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "scheduler/scheduler_config.json")


def config_file_entries(folder: Path) -> list[dict]:
    return [file_entry(folder, name) for name in CONFIG_FILES if (folder / name).is_file()]


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@dataclass
class Manifest:
    """A parsed `sdexport.json` and the folder it describes."""

    folder: Path
    data: dict[str, Any]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def pipeline(self) -> dict[str, Any]:
        return self.data["pipeline"]

    @property
    def size_multiple(self) -> int:
        return int(self.data["size_multiple"])

    @property
    def static(self) -> dict[str, int] | None:
        return self.data.get("static")

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.data["components"]

    def has(self, component: str) -> bool:
        return component in self.components

    def model_path(self, component: str) -> Path:
        return self.folder / self.components[component]["path"]

    def input_spec(self, component: str, name: str) -> dict[str, Any]:
        return next(i for i in self.components[component]["inputs"] if i["name"] == name)

    @property
    def cpu_layout_probe(self) -> dict[str, Any] | None:
        """The cpu target's NCHWc layout probe: {"path", "files"}, or None."""
        return self.data.get("cpu_layout_probe")

    @property
    def config_files(self) -> list[dict[str, Any]]:
        """The tokenizer and scheduler files with their sizes and sha256 (absent in older exports)."""
        return self.data.get("config_files", [])

    def verify(self, components: list[str] | None = None, cache: HashCache | None = None) -> None:
        """Check that every file a component, the layout probe and the configs name exists and still has its recorded sha256."""
        entries = [e for c in components or list(self.components) for e in self.components[c]["files"]]
        if self.cpu_layout_probe:
            entries += self.cpu_layout_probe["files"]
        entries += self.config_files
        for entry in entries:
            path = self.folder / entry["path"]
            if not path.is_file():
                raise ExportError(
                    f"{path} is missing: run `sdexport convert` again to rewrite the export"
                )
            if path.stat().st_size != entry["bytes"]:
                raise ExportError(
                    f"{path} has {path.stat().st_size} bytes but the manifest records "
                    f"{entry['bytes']}: the file is corrupted; run `sdexport convert` again"
                )
            digest = cache.sha256(path) if cache else sha256_file(path)
            if digest != entry["sha256"]:
                raise ExportError(
                    f"{path} does not match the sha256 in {MANIFEST_NAME}: the file is "
                    "corrupted or was changed; run `sdexport convert` again"
                )


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and sanity-check `sdexport.json`; one clear line when the folder is not an export."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder: pass the folder written by `sdexport convert`")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"{folder} is not an sdexport export ({MANIFEST_NAME} is missing): "
            "create one with `sdexport convert SOURCE -o OUT`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): run `sdexport convert` again") from e
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in READABLE_FORMAT_VERSIONS:
        raise ExportError(
            f"{path} has format version {version!r}, this runtime reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}: "
            "re-export with a matching sdexport or upgrade sdexport-runtime"
        )
    missing = [k for k in ("dtype", "target", "pipeline", "size_multiple", "components") if k not in data]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}: run `sdexport convert` again")
    return Manifest(folder=folder, data=data)


class HashCache:
    """sha256 of large files, remembered by path, size and modification time.

    Hashing a full-size U-Net takes seconds; a file whose size and mtime are unchanged is not
    hashed again. The cache lives in the user's cache folder, never inside the export.
    """

    def __init__(self, path: Path | None = None):
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        self.path = path or base / "sdruntime" / "sha256.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        cached = self.entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = sha256_file(file)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._save()
        return digest

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home only costs a re-hash next time
