"""Sessions: providers per target, the external-data guard and the sha256 cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sdruntime.manifest import ExportError, HashCache
from sdruntime.onnx_proto import external_data_locations
from sdruntime.session import ProviderError, check_external_data, resolve_providers


def tiny_model_with_external_data(folder: Path, location: str) -> Path:
    """y = x + w with w stored as external data at `location` (relative to the model's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    if location != "model.onnx_data":
        model = onnx.load(str(path), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(model, str(path))
    return path


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    path = tiny_model_with_external_data(tmp_path / "m", "model.onnx_data")
    assert external_data_locations(path) == {"model.onnx_data"}
    check_external_data(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    path = tiny_model_with_external_data(tmp_path / "m", location)
    with pytest.raises(ExportError, match="outside its folder") as err:
        check_external_data(path)
    assert "\n" not in str(err.value)


def test_exported_models_have_no_external_data(tiny32):
    assert external_data_locations(tiny32 / "unet" / "model.onnx") == set()


def test_providers_by_name_and_list():
    assert resolve_providers("cpu", "generic") == ["CPUExecutionProvider"]
    assert resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "generic") == ["CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="not installed: this onnxruntime offers"):
        resolve_providers("tensorrt", "generic")


def test_cuda_target_refused_on_cpu():
    with pytest.raises(ProviderError, match="targets 'cuda' and cannot run on CPUExecutionProvider"):
        resolve_providers("cpu", "cuda")
    with pytest.raises(ProviderError, match="can run this 'cuda' export"):
        resolve_providers(["CPUExecutionProvider"], "cuda")


def test_hash_cache_skips_unchanged_files(tmp_path):
    cache_file = tmp_path / "cache.json"
    data = tmp_path / "blob.bin"
    data.write_bytes(b"a" * 1000)
    first = HashCache(cache_file).sha256(data)
    cached = json.loads(cache_file.read_text())
    key = str(data.resolve())
    cached[key][2] = "f" * 64  # a planted value proves the second call read the cache
    cache_file.write_text(json.dumps(cached))
    assert HashCache(cache_file).sha256(data) == "f" * 64
    data.write_bytes(b"b" * 1001)  # size changes: hashed again
    assert HashCache(cache_file).sha256(data) not in (first, "f" * 64)


def test_load_without_verify_skips_hashing(tiny32, tmp_path):
    from sdruntime import StableDiffusionPipeline

    copy = Path(shutil.copytree(tiny32, tmp_path / "e"))
    manifest = json.loads((copy / "sdexport.json").read_text())
    manifest["components"]["unet"]["files"][0]["sha256"] = "0" * 64
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="does not match the sha256"):
        StableDiffusionPipeline.load(copy)
    StableDiffusionPipeline.load(copy, verify=False)


def test_tensorrt_options_caches_fp16_and_profile(tiny32):
    from sdruntime.manifest import read_manifest
    from sdruntime.session import SessionSettings, provider_options

    manifest = read_manifest(tiny32)
    settings = SessionSettings(trt_images=(1, 1, 2), trt_sizes=(64, 64, 128))
    (name, options), cuda = provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider"], manifest, "unet", settings
    )
    assert name == "TensorrtExecutionProvider" and cuda == "CUDAExecutionProvider"
    assert options["trt_fp16_enable"] == "1" and options["trt_engine_cache_path"] == str(tiny32 / "trt_cache")
    assert options["trt_profile_min_shapes"] == "sample:2x4x8x8,timestep:2,encoder_hidden_states:2x77x32"
    assert options["trt_profile_max_shapes"] == "sample:4x4x16x16,timestep:4,encoder_hidden_states:4x77x32"
    ((_, vae),) = provider_options(["TensorrtExecutionProvider"], manifest, "vae_decoder", settings)
    assert vae["trt_profile_opt_shapes"] == "latent_sample:1x4x8x8"


def test_cuda_graph_only_for_a_static_unet(tiny32):
    from dataclasses import replace

    from sdruntime.manifest import StaticShapes, read_manifest
    from sdruntime.session import SessionSettings, provider_options

    manifest = read_manifest(tiny32)
    assert provider_options(["CUDAExecutionProvider"], manifest, "unet", SessionSettings()) == ["CUDAExecutionProvider"]
    manifest = replace(manifest, static=StaticShapes(batch_size=1, height=64, width=64))
    assert provider_options(["CUDAExecutionProvider"], manifest, "unet", SessionSettings()) == [
        ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
    ]
    assert provider_options(["CUDAExecutionProvider"], manifest, "vae_decoder", SessionSettings()) == [
        "CUDAExecutionProvider"
    ]
    assert provider_options([("CUDAExecutionProvider", {"device_id": "1"})], manifest, "unet", SessionSettings()) == [
        ("CUDAExecutionProvider", {"device_id": "1"})
    ]


def test_reused_binding_refills_the_same_buffers(tiny32):
    from sdruntime import StableDiffusionPipeline

    unet = StableDiffusionPipeline.load(tiny32).component("unet")
    unet.reuse_bindings = True  # what a CUDA-graph session does
    rng = np.random.default_rng(1)
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.full(2, 7.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    first = unet.bind(feeds)
    out_a = first.run()["out_sample"]
    other = {**feeds, "timestep": np.full(2, 900.0, np.float32)}
    second = unet.bind(other)
    assert second is first
    np.testing.assert_array_equal(second.run()["out_sample"], unet.session.run(None, other)[0])
    assert not np.array_equal(out_a, unet.session.run(None, other)[0])


def test_a_model_that_fails_to_load_is_named(tiny32, tmp_path):
    """Sessions are created side by side on the CPU EP; a failure in one still reaches the caller in one line."""
    from sdruntime import StableDiffusionPipeline

    folder = tmp_path / "export"
    shutil.copytree(tiny32, folder)
    (folder / "unet" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="unet/model.onnx is not an ONNX model .*: run `sdexport convert` again"):
        StableDiffusionPipeline.load(folder, verify=False)
    model = onnx.load(str(tiny32 / "vae_decoder" / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save_model(model, str(folder / "unet" / "model.onnx"))
    with pytest.raises(ExportError, match="unet/model.onnx could not be loaded by ONNX Runtime"):
        StableDiffusionPipeline.load(folder, verify=False)
