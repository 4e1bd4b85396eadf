"""Just enough of the ONNX protobuf wire format to list external-data locations, without `onnx`.

ModelProto.graph = 7; GraphProto.initializer = 5, .node = 1, .sparse_initializer = 15;
NodeProto.attribute = 5; AttributeProto.t = 5, .tensors = 11; TensorProto.external_data = 13;
StringStringEntryProto.key = 1, .value = 2. Large blobs are skipped by their length.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path


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
