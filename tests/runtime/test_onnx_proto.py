"""onnx_proto.read_initializers: a graph's initializers read without `onnx`, checked against onnx's own reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sdruntime.manifest import ExportError
from sdruntime.onnx_proto import initializer_table, read_initializers


def onnx_arrays(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # loads external data too, from the model's folder
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_reads_a_generic_fp32_export_as_onnx_does(tiny32, component):
    path = tiny32 / component / "model.onnx"
    got = read_initializers(path)
    assert_same(got, onnx_arrays(path))
    assert {a.dtype for a in got.values()} >= {np.dtype("float32"), np.dtype("int64")}


def test_reads_an_fp16_export_as_onnx_does(tiny16):
    path = tiny16 / "unet" / "model.onnx"
    got = read_initializers(path)
    assert_same(got, onnx_arrays(path))
    assert np.dtype("float16") in {a.dtype for a in got.values()}


def small_model(initializers: list[TensorProto]) -> onnx.ModelProto:
    """A graph that only holds the initializers (an Identity per initializer keeps them used)."""
    nodes = [helper.make_node("Identity", [t.name], [f"out{i}"]) for i, t in enumerate(initializers)]
    outputs = [helper.make_tensor_value_info(f"out{i}", t.data_type, list(t.dims)) for i, t in enumerate(initializers)]
    graph = helper.make_graph(nodes, "g", [], outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_reads_external_data_as_onnx_does(tmp_path):
    """A > 2 GB model's shape: every tensor in external data files beside model.onnx, at offsets."""
    rng = np.random.default_rng(0)
    arrays = {
        "w32": rng.standard_normal((64, 32)).astype(np.float32),
        "w16": rng.standard_normal((3, 5, 7)).astype(np.float16),
        "ids": np.arange(77, dtype=np.int64).reshape(1, 77) - 5,
        "scalar": np.array(2.5, dtype=np.float32),
    }
    model = small_model([numpy_helper.from_array(a, n) for n, a in arrays.items()])
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    assert all(info.location == "model.onnx_data" for info in initializer_table(path).values())
    got = read_initializers(path, ["w16", "w32", "ids", "scalar"])
    assert_same(got, onnx_arrays(path))
    assert_same(got, arrays)
    assert not got["w32"].flags.writeable  # memory-mapped, read-only


def test_reads_one_file_per_tensor_as_torch_writes_past_2_gb(tmp_path):
    arrays = {"a": np.ones((4, 4), np.float32), "b": np.full((8,), 3, np.float16)}
    model = small_model([numpy_helper.from_array(a, n) for n, a in arrays.items()])
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert_same(read_initializers(path), onnx_arrays(path))


def test_reads_typed_fields_as_onnx_does(tmp_path):
    """Values in float_data, int32_data (float16 bits, int32) and int64_data instead of raw_data."""
    halves = np.array([0.5, -1.25, 6e-8, 65504.0], dtype=np.float16)
    tensors = [
        helper.make_tensor("f", TensorProto.FLOAT, [2, 3], [1.0, -2.0, 3.5, 0.0, 1e-30, 7.0]),
        helper.make_tensor("h", TensorProto.FLOAT16, [4], halves.astype(np.float32).tolist()),
        helper.make_tensor("i", TensorProto.INT32, [3], [-7, 0, 2**31 - 1]),
        helper.make_tensor("l", TensorProto.INT64, [2, 2], [-1, 2**40, 0, -(2**62)]),
        helper.make_tensor("d", TensorProto.DOUBLE, [2], [1.0 / 3.0, -2.0]),
    ]
    assert not any(t.raw_data for t in tensors) and list(tensors[1].int32_data) == halves.view(np.uint16).tolist()
    path = tmp_path / "model.onnx"
    onnx.save_model(small_model(tensors), str(path))
    got = read_initializers(path)
    assert_same(got, onnx_arrays(path))
    np.testing.assert_array_equal(got["h"], halves)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    model = small_model([numpy_helper.from_array(np.arange(16, dtype=np.float32), "w")])
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, str(path))
    (tmp_path / "secret.bin").write_bytes(bytes(64))
    with pytest.raises(ExportError, match="outside its folder") as err:
        read_initializers(path, ["w"])
    assert "\n" not in str(err.value)


def test_a_missing_initializer_is_named(tiny32):
    with pytest.raises(ExportError, match="has no initializer 'nope'"):
        read_initializers(tiny32 / "unet" / "model.onnx", ["nope"])
