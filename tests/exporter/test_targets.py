"""Per-target graphs: what each holds, where each runs, and the runtime's refusals."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sdruntime import StableDiffusionPipeline
from sdruntime.manifest import read_manifest
from sdruntime.session import ProviderError
from sdruntime.targets import TARGETS

from sdexport import convert
from sdexport.cli import main
from sdexport.targets import EXPORT_TARGETS

from .test_convert import COMPONENTS, latent_sizes, run_both

# tiny-sd's 512-wide feed-forward is not one of BiasSplitGelu's widths: that fusion is undone (fusion_limits.py)
CUDA_UNET_FUSED_OPS = {"MultiHeadAttention", "GroupNorm", "NhwcConv"}


def test_the_exporters_target_table():
    """The exporter's half; the runtime's is checked in tests/runtime/test_manifest.py. Both name the same targets."""
    assert tuple(EXPORT_TARGETS) == TARGETS
    assert (
        EXPORT_TARGETS["cuda"].attention == "plain" and EXPORT_TARGETS["cuda"].check_provider == "CUDAExecutionProvider"
    )
    assert EXPORT_TARGETS["cuda"].offline_level is None and EXPORT_TARGETS["cuda"].fused_ops
    assert EXPORT_TARGETS["cpu"].offline_level == "all"


def quiet_convert(out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert("tiny-sd", out, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def cuda16(tiny_cuda16):
    return tiny_cuda16  # the session's tiny-sd cuda fp16 export (tests/conftest.py)


@pytest.fixture(scope="module")
def trt32(tmp_path_factory):
    return quiet_convert(tmp_path_factory.mktemp("trt") / "export", target="tensorrt")


def op_types(path) -> dict[str, set[str]]:
    model = onnx.load(str(path))
    domains: dict[str, set[str]] = {}
    for node in model.graph.node:
        domains.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    return domains


def test_cuda_graphs_hold_the_fused_ops(cuda16):
    unet = op_types(cuda16 / "unet" / "model.onnx")
    assert CUDA_UNET_FUSED_OPS <= unet.get("com.microsoft", set())
    assert "Softmax" not in unet["ai.onnx"]  # every attention was fused
    assert "BiasSplitGelu" not in unet["com.microsoft"]
    vae = op_types(cuda16 / "vae_decoder" / "model.onnx")
    assert {"GroupNorm", "NhwcConv"} <= vae.get("com.microsoft", set())
    manifest = read_manifest(cuda16)
    assert manifest.target == "cuda" and manifest.components["unet"].attention == "plain"
    assert manifest.components["unet"].inputs[1].to_json() == {
        "name": "timestep",
        "dtype": "float32",
        "shape": ["batch"],
    }


@pytest.mark.parametrize("component", COMPONENTS)
def test_cuda_fp16_graphs_pass_onnx_full_check(cuda16, component):
    """Node order included: the fp16 converter used to append Resize's scale Casts after the Resize."""
    onnx.checker.check_model(str(cuda16 / component / "model.onnx"), full_check=True)


def test_cuda_graphs_do_not_load_on_the_cpu_ep(cuda16):
    with pytest.raises(Exception, match="NhwcConv|GroupNorm|implementation"):
        ort.InferenceSession(str(cuda16 / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_runtime_refuses_cuda_target_on_cpu(cuda16, capsys):
    with pytest.raises(ProviderError, match="targets 'cuda' and cannot run on CPUExecutionProvider"):
        StableDiffusionPipeline.load(cuda16, provider="cpu")
    from sdruntime.cli import main as runtime_main

    assert runtime_main(["generate", str(cuda16), "x"]) == 2
    assert "re-export with `sdexport convert --target generic`" in capsys.readouterr().err


def test_tensorrt_graphs_use_standard_ops_only_and_match(tiny_pipe, trt32):
    for component in COMPONENTS:
        domains = op_types(trt32 / component / "model.onnx")
        assert set(domains) == {"ai.onnx"}, domains.keys()
        expected, got = run_both(tiny_pipe, trt32, component, 2, latent_sizes(tiny_pipe)[0])
        for e, g in zip(expected, got):
            assert np.max(np.abs(e - g)) <= 1e-4
    # shape inference annotated the intermediate tensors
    model = onnx.load(str(trt32 / "unet" / "model.onnx"))
    assert len(model.graph.value_info) > len(model.graph.node) // 2


def test_tensorrt_refuses_fp16_onnx(capsys, tmp_path):
    assert main(["convert", "tiny-sd", "--target", "tensorrt", "--dtype", "fp16", "-o", str(tmp_path / "o")]) == 2
    assert "trt_fp16_enable" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fp16_on_cpu_warns(tiny16):
    with pytest.warns(UserWarning, match="fp16 graphs slower"):
        StableDiffusionPipeline.load(tiny16)


def test_inspect_prints_fusion_statistics(capsys, cuda16):
    assert main(["inspect", str(cuda16)]) == 0
    out = capsys.readouterr().out
    assert "com.microsoft.MultiHeadAttention:" in out and "com.microsoft.GroupNorm:" in out


@pytest.fixture(scope="module")
def cpu32(tiny_cpu32):
    return tiny_cpu32  # the session's tiny-sd cpu fp32 export (tests/conftest.py)


def test_cpu_graphs_carry_the_nchwc_layout_and_its_probe(tiny_pipe, cpu32):
    from sdruntime.manifest import load_schema

    jsonschema = pytest.importorskip("jsonschema")
    manifest = read_manifest(cpu32)
    jsonschema.validate(manifest.to_json(), load_schema())
    for component in ("unet", "vae_decoder", "vae_encoder"):
        assert "Conv" in op_types(cpu32 / component / "model.onnx").get("com.microsoft.nchwc", set()), component
    for component in COMPONENTS:
        for hw in latent_sizes(tiny_pipe):
            expected, got = run_both(tiny_pipe, cpu32, component, 2, hw)
            for e, g in zip(expected, got):
                assert np.max(np.abs(e - g)) <= 1e-4, component
    probe = manifest.cpu_layout_probe
    assert [f.path for f in probe.files] == ["cpu_layout_probe/model.onnx", "cpu_layout_probe/io.npz"]
    assert "Conv" in op_types(cpu32 / probe.path)["com.microsoft.nchwc"]


def test_cpu_export_draws_the_generic_picture(cpu32, tiny32):
    args = {"prompt": "a red circle", "num_inference_steps": 4, "seed": 3}
    ours = StableDiffusionPipeline.load(cpu32)(**args)
    generic = StableDiffusionPipeline.load(tiny32)(**args)
    assert np.max(np.abs(ours.latents - generic.latents)) <= 1e-4
    pixels = np.asarray(ours.images[0]).astype(int) - np.asarray(generic.images[0])
    assert np.abs(pixels).max() <= 1


def copy_with_probe(source: Path, folder: Path, change_model=None, change_output=None) -> Path:
    """A copy of a cpu export whose probe behaves as on another CPU, its sha256 values updated to match."""
    from sdruntime.manifest import MANIFEST_NAME, file_entry

    shutil.copytree(source, folder)
    probe = folder / "cpu_layout_probe"
    if change_model:
        model = onnx.load(str(probe / "model.onnx"))
        change_model(model)
        onnx.save_model(model, str(probe / "model.onnx"))
    if change_output:
        io = dict(np.load(probe / "io.npz"))
        io["y"] = change_output(io["y"])
        np.savez(probe / "io.npz", **io)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["cpu_layout_probe"]["files"] = [
        file_entry(folder, f["path"]).to_json() for f in data["cpu_layout_probe"]["files"]
    ]
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return folder


def test_runtime_refuses_a_layout_made_for_another_cpu(cpu32, tmp_path, capsys):
    StableDiffusionPipeline.load(cpu32)  # the probe passes on the machine that made it

    def blocks_swapped(y):  # channels read in another block order
        return y.reshape(1, -1, 16, *y.shape[2:])[:, ::-1].reshape(y.shape).copy()

    folder = copy_with_probe(cpu32, tmp_path / "export", change_output=blocks_swapped)
    with pytest.raises(ProviderError, match="laid out for another CPU"):
        StableDiffusionPipeline.load(folder)
    from sdruntime.cli import main as runtime_main

    assert runtime_main(["generate", str(folder), "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sdexport convert --target cpu" in err[0]


def test_fp16_cpu_graphs_skip_the_layout(tmp_path):
    out = quiet_convert(tmp_path / "export", target="cpu", dtype="fp16", components=["unet"])
    assert "com.microsoft.nchwc" not in op_types(out / "unet" / "model.onnx")
    assert read_manifest(out).cpu_layout_probe is None


def test_offline_optimization_writes_the_weights_to_one_external_file(tiny32, tmp_path, monkeypatch):
    """ORT writes the optimized graph's weights beside it (a > 2 GB graph cannot hold them) and they are read back."""
    import sdexport.optimize as optimize

    model = onnx.load(str(tiny32 / "unet" / "model.onnx"))
    written = []
    real_load = onnx.load

    def load(path, *a, **k):
        written.extend(sorted(p.name for p in Path(path).parent.iterdir()))
        return real_load(path, *a, **k)

    monkeypatch.setattr(optimize.onnx, "load", load)
    optimized = optimize.ort_offline_optimize(model, "all")
    assert written == ["model.onnx", "model.onnx_data"]
    assert optimize.uses_cpu_layout(optimized)
    path = tmp_path / "model.onnx"
    onnx.save_model(optimized, str(path))
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.array([10.0, 10.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    expected = ort.InferenceSession(str(tiny32 / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    assert np.max(np.abs(got - expected)) <= 1e-4


def test_runtime_refuses_a_layout_it_cannot_run(cpu32, tmp_path):
    """An ONNX Runtime without NCHWc kernels for the CPU fails on the probe: one clear line, not ORT's error."""

    def unknown_kernel(model):
        next(n for n in model.graph.node if n.domain == "com.microsoft.nchwc").op_type = "NoSuchKernel"

    folder = copy_with_probe(cpu32, tmp_path / "export", change_model=unknown_kernel)
    with pytest.raises(
        ProviderError, match="laid out for another CPU \\(it cannot run the layout probe: .*NoSuchKernel"
    ):
        StableDiffusionPipeline.load(folder)


def test_format_version_marks_the_probe(cpu32, tiny32, tmp_path):
    """Runtimes that read version 1 only would skip the probe: cpu exports with one are version 2."""
    from sdruntime.manifest import MANIFEST_NAME, ExportError

    assert read_manifest(cpu32).format_version == 2
    assert read_manifest(tiny32).format_version == 1
    folder = tmp_path / "export"
    shutil.copytree(tiny32, folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["format_version"] = 3
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(
        ExportError, match="format version 3, this runtime reads versions 1, 2: .*upgrade sdexport-runtime"
    ):
        read_manifest(folder)


@pytest.mark.parametrize("name", ["model.onnx", "io.npz"])
def test_a_missing_probe_file_is_named(cpu32, tmp_path, name):
    from sdruntime.manifest import ExportError

    folder = tmp_path / "export"
    shutil.copytree(cpu32, folder)
    (folder / "cpu_layout_probe" / name).unlink()
    with pytest.raises(ExportError, match=f"cpu_layout_probe/{name} is missing: run `sdexport convert` again"):
        StableDiffusionPipeline.load(folder, verify=False)


def test_session_levels_on_the_cpu_ep(cpu32, tiny32):
    """Laid-out graphs load at "basic"; others get the NCHWc layout at load time for the VAE only."""
    from sdruntime.ort_options import LEVELS
    from sdruntime.session import SessionSettings, session_options

    cpu = ["CPUExecutionProvider"]

    def level(folder, component):
        return session_options(SessionSettings(), read_manifest(folder), cpu, component).graph_optimization_level

    assert level(cpu32, "vae_decoder") == level(cpu32, "unet") == LEVELS["basic"]
    assert level(tiny32, "vae_decoder") == LEVELS["all"] and level(tiny32, "unet") == LEVELS["basic"]


def relay(weight, block: int, new_block: int):
    """OIHW weights stored in ORT's NCHWc filter order ([O/b][I/b][kh][kw][bi][bo]) for another block width."""
    o, i, kh, kw = weight.shape
    flat = weight.reshape(o // block, i // block, kh, kw, block, block)
    oihw = flat.transpose(0, 5, 1, 4, 2, 3).reshape(o, i, kh, kw)
    relaid = oihw.reshape(o // new_block, new_block, i // new_block, new_block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    return np.ascontiguousarray(relaid).reshape(o, i, kh, kw)


def test_runtime_refuses_graphs_laid_out_for_another_vector_width(cpu32, tmp_path):
    """The probe's filter re-laid in the other NCHWc block width (8 <-> 16), as another CPU's ORT writes it."""
    from onnx import numpy_helper

    from sdexport.optimize import ort_offline_optimize

    # this machine's block width, from a convolution whose plain weights are known
    weight = np.random.default_rng(1).standard_normal((32, 32, 3, 3), dtype=np.float32)
    conv = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32, 4, 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    stored = next(
        numpy_helper.to_array(t)
        for t in ort_offline_optimize(conv, "all").graph.initializer
        if t.dims == [32, 32, 3, 3]
    )
    block = next(b for b in (4, 8, 16) if np.array_equal(relay(stored, b, 1), weight))  # 1: plain OIHW
    other = 8 if block == 16 else 16

    def other_width(model):
        tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
        tensor.CopyFrom(numpy_helper.from_array(relay(numpy_helper.to_array(tensor), block, other), tensor.name))

    folder = copy_with_probe(cpu32, tmp_path / "export", change_model=other_width)
    with pytest.raises(ProviderError, match="laid out for another CPU \\(it computes the layout probe differently"):
        StableDiffusionPipeline.load(folder)
