"""Read tensors from PyTorch's `torch.save` files (`.pt`, `.bin`) without torch, and without running the pickle.

A file from `torch.save` is a zip archive (`<name>/data.pkl` and one `<name>/data/<key>` per storage) or, before
torch 1.6, one stream of pickles followed by the storages' bytes. The pickle names the functions that rebuild
tensors; an ordinary unpickler would import and call whatever it names, so a file could run any code. Here a
restricted unpickler resolves only the names that tensors and their containers need (`_rebuild_tensor_v2`,
`_rebuild_parameter`, the float storage types, `OrderedDict`) to harmless stand-ins and refuses every other name
in one line. Tensors come back as NumPy arrays (bfloat16 as float32), in dicts, lists and tuples.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidArgument

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch's legacy (non-zip) format starts with this pickled int
BFLOAT16 = "bfloat16"
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("float32"),
    "HalfStorage": np.dtype("float16"),
    "DoubleStorage": np.dtype("float64"),
    "BFloat16Storage": BFLOAT16,  # read as uint16 and widened to float32
}


class TorchFileError(InvalidArgument):
    """A .pt/.bin file this reader cannot or will not load; the message names the file and why."""


@dataclass(frozen=True)
class StorageType:
    """What `torch.FloatStorage` and its kin stand for here: the element type of a storage."""

    name: str

    @property
    def itemsize(self) -> int:
        return 2 if self.name == "BFloat16Storage" else np.dtype(STORAGE_DTYPES[self.name]).itemsize


@dataclass
class Storage:
    """One saved storage; its values are filled in once they are read (the legacy format stores them last)."""

    kind: StorageType
    key: str
    numel: int
    values: np.ndarray | None = None
    view: tuple[str, int, int] | None = None  # legacy views: (view key, offset, numel) into this root storage


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it; `materialize` turns it into an array once the storages are read."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2's stand-in: records where the tensor's values lie."""
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a saved storage")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter's stand-in: a parameter is its tensor."""
    return data


SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only SAFE_GLOBALS, the float storage types and saved storages; any other name
    is refused."""

    def __init__(self, file, path: Path, storages: dict[str, Storage]):
        super().__init__(file)
        self.path = path
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)  # a fresh one: nothing the pickle does to it outlives this load
        raise TorchFileError(
            f"{self.path} holds a pickled {module}.{name}, which is not a tensor: refusing to run it (only tensors "
            "and plain containers are read from .pt/.bin files; convert it to .safetensors)"
        )

    def persistent_load(self, pid):
        # zip: ('storage', type, key, location, numel); legacy: the same and view metadata
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"an unknown persistent id {str(pid)[:60]}")
        kind, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(kind, StorageType):
            raise pickle.UnpicklingError("a storage of an unknown type")
        storage = self.storages.setdefault(key, Storage(kind, key, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        view_key, offset, view_numel = str(view[0]), int(view[1]), int(view[2])
        return self.storages.setdefault(view_key, Storage(kind, view_key, view_numel, view=(key, offset, view_numel)))


def storage_values(kind: StorageType, data: bytes, numel: int, little_endian: bool) -> np.ndarray:
    """A storage's bytes as a flat array (bfloat16 widened to float32)."""
    if len(data) != numel * kind.itemsize:
        raise ValueError(f"a storage holds {len(data)} bytes for {numel} values")
    order = "<" if little_endian else ">"
    if kind.name == "BFloat16Storage":
        bits = np.frombuffer(data, f"{order}u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(data, np.dtype(STORAGE_DTYPES[kind.name]).newbyteorder(order))


def materialize(ref: TensorRef) -> np.ndarray:
    """The tensor's values, copied out of its storage after checking that its extent lies inside it."""
    values = ref.storage.values
    if len(ref.size) != len(ref.stride) or any(s < 0 for s in (*ref.size, *ref.stride)) or ref.offset < 0:
        raise ValueError("a tensor with a negative size, stride or offset")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) if all(ref.size) else ref.offset - 1
    if last >= len(values):
        raise ValueError(f"a tensor reaches past its storage ({last + 1} > {len(values)} values)")
    if not all(ref.size):
        return np.zeros(ref.size, values.dtype.newbyteorder("="))
    strided = np.lib.stride_tricks.as_strided(
        values[ref.offset :], shape=ref.size, strides=tuple(s * values.itemsize for s in ref.stride), writeable=False
    )
    return np.array(strided, dtype=values.dtype.newbyteorder("="))


def resolve(value):
    """Replace every TensorRef inside dicts, lists and tuples by its array."""
    if isinstance(value, TensorRef):
        return materialize(value)
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v) for v in value)
    return value


def load_zip(path: Path) -> object:
    """torch.save's zip format: data.pkl, then each storage from data/<key>."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError("a zip archive without one <name>/data.pkl, so not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict[str, Storage] = {}
        result = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, storages).load()
        order = f"{prefix}byteorder"
        little = order not in names or archive.read(order).strip() == b"little"
        for storage in storages.values():
            data = archive.read(f"{prefix}data/{storage.key}")
            storage.values = storage_values(storage.kind, data, storage.numel, little)
    return resolve(result)


def load_legacy(path: Path) -> object:
    """torch.save's format before torch 1.6: magic, version and system pickles, the object, the storage keys,
    then each storage as an int64 count and its values."""
    with path.open("rb") as stream:
        if stream.read(1) != b"\x80":  # every pickle from protocol 2 on opens with PROTO
            raise ValueError("neither a zip archive nor a pickle")
        stream.seek(0)
        plain: dict[str, Storage] = {}  # the header pickles name no storage
        if RestrictedUnpickler(stream, path, plain).load() != MAGIC_NUMBER:
            raise ValueError("neither a zip archive nor torch's legacy format")
        RestrictedUnpickler(stream, path, plain).load()  # protocol version
        sys_info = RestrictedUnpickler(stream, path, plain).load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: dict[str, Storage] = {}
        result = RestrictedUnpickler(stream, path, storages).load()
        keys = RestrictedUnpickler(stream, path, plain).load()
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q" if little else ">q", stream.read(8))
            storage.values = storage_values(storage.kind, stream.read(numel * storage.kind.itemsize), numel, little)
    for storage in storages.values():
        if storage.view is not None:
            root_key, offset, numel = storage.view
            storage.values = storages[root_key].values[offset : offset + numel]
    return resolve(result)


def load(path: str | Path) -> object:
    """The object a `torch.save` file holds, tensors as NumPy arrays; TorchFileError (one line) when the file
    is not one, is damaged, or names anything but tensors and containers."""
    path = Path(path)
    try:
        return load_zip(path) if zipfile.is_zipfile(path) else load_legacy(path)
    except TorchFileError:
        raise
    except OSError as e:
        raise TorchFileError(f"{path} cannot be read ({e.strerror or e}): check the path") from e
    except Exception as e:  # pickle, zip, struct and shape errors of a damaged or foreign file
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise TorchFileError(
            f"{path} is not a readable torch.save file ({reason}): re-save it or use .safetensors"
        ) from e
