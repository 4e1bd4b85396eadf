"""Writing ONNX graphs: in one file, or past protobuf's 2 GB with every tensor in one model.onnx_data
beside it; `OnDisk` graphs keep their weights in files until they are written."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data
from onnxruntime.transformers.float16 import convert_np_to_float16

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_NAME = "model.onnx_data"
# What fp16 conversion does to fp32 values out of fp16's range (ORT's converter, whose defaults these are)
FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX_FINITE = 65504.0


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too big for one protobuf (2 GB); ByteSize() itself fails beyond that."""
    tensors = sum(t.ByteSize() for t in model.graph.initializer)
    return tensors + len(model.graph.node) * 512 > PROTOBUF_LIMIT


@dataclass
class OnDisk:
    """A graph whose weights stay in files until it is written (components past 2 GB): `model` is the
    graph with references (ONNX external data) into `folder`, and `fp16` names the tensors stored
    there in fp32 that are written in fp16 (precision.to_fp16 converts the graph and names them).
    Holding an SDXL U-Net's 10.3 GB of weights in Python while ONNX Runtime optimizes or writes them
    would pass 16 GB; this way one tensor at a time is in memory."""

    model: onnx.ModelProto
    folder: Path
    fp16: frozenset[str] = frozenset()
    owner: object = field(default=None, repr=False)  # the TemporaryDirectory holding `folder`, if any


def graph_of(model: onnx.ModelProto | OnDisk) -> onnx.ModelProto:
    """The graph of a model held in memory or on disk (with the weights of neither)."""
    return model.model if isinstance(model, OnDisk) else model


def save_model(model: onnx.ModelProto | OnDisk, path: Path) -> list[str]:
    """Write model.onnx, with every tensor in one model.onnx_data beside it when over 2 GB.

    Returns the file names written, relative to the model's folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, OnDisk):
        return save_on_disk(model, path)
    if not is_large(model):
        onnx.save_model(model, str(path))
        return [path.name]
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
        size_threshold=1024,
    )
    # onnx creates the data file readable by its owner only; give it model.onnx's permissions
    shutil.copymode(path, path.parent / EXTERNAL_DATA_NAME)
    return [path.name, EXTERNAL_DATA_NAME]


def save_on_disk(disk: OnDisk, path: Path) -> list[str]:
    """Write an OnDisk graph as save_model writes one held in memory: its external tensors are read one
    at a time (and converted to fp16 where `disk.fp16` says) into one model.onnx_data, or into
    model.onnx itself when the whole model fits in 2 GB (an SD 1.5 U-Net in fp16)."""
    model = disk.model
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    written = sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in external)
    if written + model.ByteSize() + len(model.graph.node) * 512 <= PROTOBUF_LIMIT:
        for tensor in external:
            data = stored_tensor(disk, tensor)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
        onnx.save_model(model, str(path))
        return [path.name]
    offset = 0
    with open(path.parent / EXTERNAL_DATA_NAME, "wb") as out:
        for tensor in external:
            data = stored_tensor(disk, tensor)
            set_external_location(tensor, offset, len(data))
            out.write(data)
            offset += len(data)
    onnx.save_model(model, str(path))
    shutil.copymode(path, path.parent / EXTERNAL_DATA_NAME)
    return [path.name, EXTERNAL_DATA_NAME]


def stored_tensor(disk: OnDisk, tensor: onnx.TensorProto) -> bytes:
    """The bytes of one of the graph's external tensors as they are to be written (fp16 where converted)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    data = np.fromfile(
        disk.folder / info["location"], dtype=np.uint8, count=int(info["length"]), offset=int(info.get("offset", 0))
    )
    if tensor.name in disk.fp16:
        data = convert_np_to_float16(data.view(np.float32), FP16_MIN_POSITIVE, FP16_MAX_FINITE).astype(np.float16)
    expected = math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    if data.nbytes != expected:
        raise RuntimeError(
            f"{tensor.name} holds {data.nbytes} bytes in {info['location']}, its type and shape {expected}"
        )
    return data.tobytes()


def set_external_location(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
