"""Just enough of the ONNX protobuf wire format to list external-data locations and to read a graph's
initializers into NumPy, without `onnx`.

ModelProto.graph = 7; GraphProto.initializer = 5, .node = 1, .sparse_initializer = 15;
NodeProto.attribute = 5; AttributeProto.t = 5, .tensors = 11; TensorProto.external_data = 13;
StringStringEntryProto.key = 1, .value = 2. Large blobs are skipped by their length.
TensorProto: dims = 1, data_type = 2, float_data = 4, int32_data = 5, int64_data = 7, name = 8,
raw_data = 9, double_data = 10, data_location = 14 (1: external).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import ExportError


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor_locations(buf, start: int, end: int) -> Iterator[str]:
    for number, s, e in _fields(buf, start, end):
        if number == 13:
            entry = {n: bytes(buf[a:b]).decode("utf-8", "replace") for n, a, b in _fields(buf, s, e)}
            if entry.get(1) == "location":
                yield entry.get(2, "")


def _graph_locations(buf, start: int, end: int) -> Iterator[str]:
    for number, s, e in _fields(buf, start, end):
        if number == 5:
            yield from _tensor_locations(buf, s, e)
        elif number == 15:  # SparseTensorProto: values = 1, indices = 2
            for n, a, b in _fields(buf, s, e):
                if n in (1, 2):
                    yield from _tensor_locations(buf, a, b)
        elif number == 1:
            for n, a, b in _fields(buf, s, e):
                if n == 5:
                    for m, c, d in _fields(buf, a, b):
                        if m in (5, 11):
                            yield from _tensor_locations(buf, c, d)
                        elif m in (6, 12):  # subgraphs (If/Loop bodies)
                            yield from _graph_locations(buf, c, d)


def external_data_locations(model_path: Path) -> set[str]:
    with open(model_path, "rb") as f:
        if Path(model_path).stat().st_size == 0:
            return set()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            view = memoryview(buf)
            try:
                locations = set()
                for number, s, e in _fields(view, 0, len(view)):
                    if number == 7:
                        locations.update(_graph_locations(view, s, e))
                return locations
            finally:
                view.release()


# TensorProto.DataType -> NumPy (little-endian, as ONNX stores raw data); bfloat16 and strings are not read
DATA_TYPES = {
    1: np.dtype("<f4"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    9: np.dtype("?"),
    10: np.dtype("<f2"),
    11: np.dtype("<f8"),
    12: np.dtype("<u4"),
    13: np.dtype("<u8"),
}


@dataclass(frozen=True)
class InitializerInfo:
    """Where one initializer's values are: embedded (`raw`: its bytes' span in model.onnx, or `typed`: the
    spans of float_data/int32_data/int64_data/double_data) or external (`location`, `offset`, `length`)."""

    name: str
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None = None
    typed: tuple[tuple[int, int, int, int], ...] = ()  # (field, wire type, start, end)
    location: str | None = None
    offset: int = 0
    length: int | None = None

    @property
    def dtype(self) -> np.dtype:
        if self.data_type not in DATA_TYPES:
            raise ExportError(f"initializer '{self.name}' has ONNX data type {self.data_type}, which is not read here")
        return DATA_TYPES[self.data_type]

    @property
    def size(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))


def _wire_fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b) of every field in buf[start:end]: a varint's value in a (b = 0),
    a fixed or length-delimited field's bytes in buf[a:b]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, 0
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, pos, pos + size
            pos += size
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _packed_varints(buf, start: int, end: int) -> list[int]:
    values, pos = [], start
    while pos < end:
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def _tensor_info(buf, start: int, end: int) -> InitializerInfo:
    fields = {"name": "", "dims": [], "data_type": 0, "raw": None, "typed": [], "external": {}}
    for number, wire, a, b in _wire_fields(buf, start, end):
        if number == 1:
            fields["dims"] += [a] if wire == 0 else _packed_varints(buf, a, b)
        elif number == 2:
            fields["data_type"] = a
        elif number == 8:
            fields["name"] = bytes(buf[a:b]).decode("utf-8")
        elif number == 9:
            fields["raw"] = (a, b)
        elif number in (4, 5, 7, 10):
            fields["typed"].append((number, wire, a, b))
        elif number == 13:
            entry = {n: bytes(buf[c:d]).decode("utf-8", "replace") for n, _, c, d in _wire_fields(buf, a, b)}
            fields["external"][entry.get(1, "")] = entry.get(2, "")
    external = fields["external"]
    length = external.get("length")
    return InitializerInfo(
        fields["name"],
        tuple(np.array(fields["dims"], dtype=np.uint64).astype(np.int64).tolist()),
        fields["data_type"],
        raw=fields["raw"],
        typed=tuple(fields["typed"]),
        location=external.get("location"),
        offset=int(external.get("offset", 0)),
        length=int(length) if length is not None else None,
    )


def _graph_span(buf) -> tuple[int, int]:
    for number, s, e in _fields(buf, 0, len(buf)):
        if number == 7:
            return s, e
    raise ValueError("no graph")


def _initializer_infos(buf) -> dict[str, InitializerInfo]:
    start, end = _graph_span(buf)
    infos = {}
    for number, s, e in _fields(buf, start, end):
        if number == 5:
            info = _tensor_info(buf, s, e)
            infos[info.name] = info
    return infos


def _mapped(path: Path):
    """A read-only memory map of a whole file (None for an empty one)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def initializer_table(model_path: str | os.PathLike) -> dict[str, InitializerInfo]:
    """Every initializer of the model's main graph by name: dims, data type and where its values are,
    read without loading them (a graph's weights in external data are not opened)."""
    model_path = Path(model_path)
    buf = _mapped(model_path)
    if buf is None:
        raise ExportError(f"{model_path} is empty: run `sdexport convert` again")
    view = memoryview(buf)
    try:
        return _initializer_infos(view)
    except (ValueError, IndexError) as e:
        raise ExportError(f"{model_path} is not an ONNX model ({e}): run `sdexport convert` again") from e
    finally:
        view.release()
        buf.close()


def _typed_values(buf, info: InitializerInfo) -> np.ndarray:
    """An initializer held in float_data/double_data (packed or not) or in int32_data/int64_data varints
    (float16 as its bits in int32_data, ONNX's convention)."""
    dtype = info.dtype
    parts = []
    for number, wire, a, b in info.typed:
        if number in (4, 10):
            parts.append(np.frombuffer(bytes(buf[a:b]), "<f4" if number == 4 else "<f8"))
        elif wire == 0:
            parts.append(np.array([a], dtype=np.uint64))
        else:
            parts.append(np.array(_packed_varints(buf, a, b), dtype=np.uint64))
    if not parts:
        return np.zeros(info.dims, dtype)
    values = np.concatenate(parts)
    if values.dtype == np.uint64:  # varints: two's complement 64-bit, narrowed to the tensor's type
        values = values.view(np.int64)
        if dtype == np.float16:
            values = values.astype(np.uint16).view(np.float16)
    return values.astype(dtype, copy=False).reshape(info.dims)


def _external_path(model_path: Path, location: str) -> Path:
    """The external data file, refused when its location leaves the model's folder (as check_external_data)."""
    folder = model_path.parent.resolve()
    target = (folder / location).resolve()
    if os.path.isabs(location) or folder not in target.parents:
        raise ExportError(
            f"{model_path} points its external data at '{location}', outside its folder: "
            "refusing to read it; re-export the model or move the data beside model.onnx"
        )
    return target


def _external_values(model_path: Path, info: InitializerInfo, maps: dict) -> np.ndarray:
    path = _external_path(model_path, info.location)
    if path not in maps:
        if not path.is_file():
            raise ExportError(f"{model_path}'s external data {info.location} is missing: run `sdexport convert` again")
        maps[path] = _mapped(path)
    buf, nbytes = maps[path], info.size * info.dtype.itemsize
    if nbytes == 0:
        return np.zeros(info.dims, info.dtype)
    available = (len(buf) if buf is not None else 0) - info.offset
    if (info.length is not None and info.length != nbytes) or available < nbytes:
        raise ExportError(
            f"{model_path}: initializer '{info.name}' does not fit its external data {info.location}: "
            "run `sdexport convert` again"
        )
    return np.frombuffer(buf, info.dtype, info.size, info.offset).reshape(info.dims)


def read_initializers(model_path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The named initializers of the model's main graph (all of them when `names` is None) as NumPy arrays,
    without `onnx`: raw data is memory-mapped, from model.onnx or from external data files (which must lie
    inside the model's folder), so only the pages a caller touches are read. The arrays are read-only."""
    model_path = Path(model_path)
    table = initializer_table(model_path)
    wanted = list(table) if names is None else list(names)
    missing = [name for name in wanted if name not in table]
    if missing:
        raise ExportError(f"{model_path} has no initializer '{missing[0]}': run `sdexport convert` again")
    model, maps, arrays = None, {}, {}
    for name in wanted:
        info = table[name]
        if info.location is not None:
            arrays[name] = _external_values(model_path, info, maps)
            continue
        model = model or _mapped(model_path)
        if info.raw is not None:
            start, end = info.raw
            if end - start != info.size * info.dtype.itemsize:
                raise ExportError(f"{model_path}: initializer '{name}' has the wrong number of bytes")
            arrays[name] = np.frombuffer(model, info.dtype, info.size, start).reshape(info.dims)
        else:
            arrays[name] = _typed_values(model, info)
    return arrays
