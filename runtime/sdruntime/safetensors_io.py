"""Read .safetensors files with NumPy alone (no `safetensors`, no torch): LoRAs and embeddings.

The format (huggingface/safetensors): 8 bytes, little-endian u64 N; N bytes of JSON, an object mapping each
tensor's name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows the
header), plus an optional "__metadata__" object of strings; then the raw, little-endian, C-ordered data.
F32 and F16 read as themselves, BF16 as float32 (its bits are float32's upper half); a malformed file is
refused in one line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import InvalidArgument

DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class SafetensorsError(InvalidArgument):
    """A file that is not a readable .safetensors file; the message names it and what is wrong."""


def _refuse(path: Path, why: str) -> SafetensorsError:
    return SafetensorsError(f"{path} is not a readable .safetensors file ({why}): pass a .safetensors file")


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries by name, the `__metadata__` strings, the byte offset where the data starts), checked:
    every entry has a known dtype, a shape and data_offsets inside the file that match the shape."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(MAX_HEADER, size - 8):
                raise _refuse(path, "its first 8 bytes give no header length that fits the file")
            text = f.read(length)
    except OSError as e:
        raise InvalidArgument(f"{path} cannot be read ({e.strerror or e}): check the path") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _refuse(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _refuse(path, "its __metadata__ is not an object")
    data_size = size - 8 - length
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + length


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict):
        raise _refuse(path, f"the entry of '{name}' is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise _refuse(path, f"'{name}' is {dtype}; only {', '.join(DTYPES)} tensors are read")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _refuse(path, f"'{name}' has no valid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise _refuse(path, f"the data_offsets of '{name}' lie outside the file")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype].itemsize:
        raise _refuse(path, f"the data of '{name}' does not match its {dtype} shape {shape}")


def _as_array(raw: np.ndarray, entry: Mapping) -> np.ndarray:
    array = raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    if entry["dtype"] == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(every tensor by name, the file's `__metadata__`). The tensors share one read-only buffer of the
    file's data (BF16 ones are converted to float32 copies)."""
    header, metadata, start = read_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = np.frombuffer(f.read(), np.uint8)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = _as_array(data[begin:end], entry)
    return tensors, metadata
