"""ControlNet export: `convert --controlnet` and `add-controlnet` write controlnet/NAME graphs that match PyTorch,
the U-Net takes their residuals (defaulting to zeros, required on the tensorrt target), adding one leaves every
other graph as it was, and a ControlNet that does not fit is refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sdruntime import StableDiffusionPipeline
from sdruntime.manifest import read_manifest

from sdexport.cli import main
from tests.conftest import _quiet_convert

PROMPT = "a red circle on a blue background, top left"


@pytest.fixture(scope="module")
def with_controlnet(tmp_path_factory):
    return _quiet_convert("tiny-sd", tmp_path_factory.mktemp("cn") / "out", controlnets=["edges=tiny-controlnet"])


def pattern(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(
        np.kron(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    )


def test_manifest_lists_the_controlnet_with_its_hashes_and_residuals(with_controlnet):
    manifest = read_manifest(with_controlnet)
    entry = manifest.components["controlnet/edges"]
    assert entry.path == "controlnet/edges/model.onnx"
    manifest.verify()  # every file, the ControlNet's included, against its sha256
    assert entry.export_max_abs_diff is not None and entry.export_max_abs_diff < 1e-4
    outputs = [o.name for o in entry.outputs]
    residuals = [i.name for i in manifest.components["unet"].inputs if "residual" in i.name]
    assert len(outputs) == len(residuals) == len(manifest.pipeline.unet_residual_scales) == 5  # 1 + 2 + 1 down, 1 mid
    assert [o.shape[1] for o in entry.outputs] == list(manifest.pipeline.unet_residual_channels)
    assert (with_controlnet / "controlnet" / "edges" / "config.json").is_file()
    assert not (with_controlnet / ".fp32").exists()


def test_unet_residuals_default_to_zeros(with_controlnet):
    assert read_manifest(with_controlnet).pipeline.unet_residual_defaults is True
    session = ort.InferenceSession(str(with_controlnet / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["sample", "timestep", "encoder_hidden_states"]
    defaults = session.get_overridable_initializers()
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8), np.float32),
        "timestep": np.array([500.0, 20.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32),
    }
    plain = session.run(None, feeds)[0]
    sizes = {"height": 8, "width": 8, "height_2": 4, "width_2": 4}
    zeros = {d.name: np.zeros((2, d.shape[1], sizes[d.shape[2]], sizes[d.shape[3]]), np.float32) for d in defaults}
    np.testing.assert_array_equal(session.run(None, {**feeds, **zeros})[0], plain)
    ones = {name: value + 1 for name, value in zeros.items()}
    assert np.abs(session.run(None, {**feeds, **ones})[0] - plain).max() > 1e-3  # fed residuals are used


def test_add_controlnet_leaves_the_other_graphs_alone(with_controlnet, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(with_controlnet, out)
    before = {name: [f.sha256 for f in e.files] for name, e in read_manifest(out).components.items()}
    assert main(["add-controlnet", str(out), "again=tiny-controlnet"]) == 0
    manifest = read_manifest(out)
    manifest.verify()
    assert {name: [f.sha256 for f in manifest.components[name].files] for name in before} == before
    assert [f.sha256 for f in manifest.components["controlnet/again"].files] == before["controlnet/edges"]
    pipe = StableDiffusionPipeline.load(out)
    image = pattern(64, 1)
    args = dict(num_inference_steps=3, seed=2, control_image=image)
    added = pipe(PROMPT, controlnet="again", **args).images[0]
    exported = pipe(PROMPT, controlnet="edges", **args).images[0]
    assert np.array_equal(np.asarray(added), np.asarray(exported))
    assert main(["add-controlnet", str(out), "again=tiny-controlnet"]) == 2  # the name is taken
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["convert", "tiny-sd", "--controlnet", "tiny-sdxl-controlnet"],
            "ControlNet 'tiny-sdxl-controlnet' is for another model",
        ),
        (["convert", "tiny-sd", "--controlnet", "nowhere/cn"], "no such folder, file or ControlNet preset"),
        (
            ["convert", "tiny-sd", "--controlnet", "a=tiny-controlnet", "--controlnet", "a=tiny-controlnet"],
            "two ControlNets are named 'a'",
        ),
        (["convert", "tiny-sd", "--controlnet", "bad name=tiny-controlnet"], "is not a usable name"),
        (
            ["convert", "tiny-sd", "--controlnet", "tiny-controlnet", "--components", "text_encoder"],
            "keep unet in --components",
        ),
    ],
)
def test_bad_controlnets_are_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main([*args[:2], "-o", str(out), *args[2:]]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdexport: error:")]
    assert len(error) == 1 and message in error[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_add_controlnet_refuses_an_export_without_residual_inputs(with_controlnet, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(with_controlnet, out)
    data = json.loads((out / "sdexport.json").read_text())
    del data["pipeline"]["unet_residual_scales"]  # as an export made before ControlNets
    (out / "sdexport.json").write_text(json.dumps(data))
    assert main(["add-controlnet", str(out), "tiny-controlnet"]) == 2
    assert "takes no ControlNet residuals" in capsys.readouterr().err


def test_fp16_controlnet_runs_within_the_fp16_tolerance(tmp_path):
    out = _quiet_convert("tiny-sd", tmp_path / "fp16", dtype="fp16", controlnets=["tiny-controlnet"])
    entry = read_manifest(out).components["controlnet/tiny-controlnet"]
    assert entry.dtype == "fp16" and entry.export_relative_l2 < 1e-2
    assert {o.dtype for o in entry.outputs} == {"float16"}
    image = pattern(64, 3)
    result = StableDiffusionPipeline.load(out)(PROMPT, num_inference_steps=2, seed=1, control_image=image)
    assert np.isfinite(result.latents).all()


def test_tensorrt_target_unet_requires_its_residuals(tmp_path):
    out = _quiet_convert("tiny-sd", tmp_path / "trt", target="tensorrt", components=["unet"])
    model = onnx.load(str(out / "unet" / "model.onnx"))
    initializers = {t.name for t in model.graph.initializer}
    residuals = [i.name for i in model.graph.input if "residual" in i.name]
    assert len(residuals) == 5 and not initializers.intersection(residuals)
    # so TensorRT's shape profile covers them, as it does every input
    from sdruntime.session import SessionSettings, provider_options

    manifest = read_manifest(out)
    assert manifest.pipeline.unet_residual_defaults is False
    ((_, options),) = provider_options(["TensorrtExecutionProvider"], manifest, "unet", SessionSettings())
    assert "mid_block_additional_residual:8x64x4x4" in options["trt_profile_max_shapes"]


def test_cuda_target_fuses_the_controlnet_within_the_kernels_limits(tmp_path):
    """The cuda target's graphs run on the CUDA EP only: checked here by their ops and types."""
    out = _quiet_convert("tiny-sd", tmp_path / "cuda", target="cuda", dtype="fp16", controlnets=["tiny-controlnet"])
    model = onnx.load(str(out / "controlnet" / "tiny-controlnet" / "model.onnx"))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert "GroupNorm" in ops or "SkipGroupNorm" in ops  # ORT's Stable Diffusion fusions ran on it
    assert read_manifest(out).components["controlnet/tiny-controlnet"].attention == "plain"


def test_a_static_export_runs_its_controlnet_at_its_batch_and_refuses_others(tmp_path):
    from sdruntime.request import GenerationError

    out = _quiet_convert(
        "tiny-sd", tmp_path / "static", static=True, batch_size=1, height=64, width=64, controlnets=["tiny-controlnet"]
    )
    pipe = StableDiffusionPipeline.load(out)
    image = pattern(64, 4)
    assert np.isfinite(pipe(PROMPT, num_inference_steps=2, seed=1, control_image=image).latents).all()
    for extra in ({"num_images": 2}, {"guess_mode": True}):
        with pytest.raises(GenerationError, match="static export's ControlNets take 2 rows"):
            pipe(PROMPT, num_inference_steps=2, seed=1, control_image=image, **extra)
