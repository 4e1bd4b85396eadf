"""ControlNet single files in the original (LDM) layout, as lllyasviel's ControlNet-v1-1 files are: configured from
the pipeline's U-Net, converted by diffusers' own converter, and exported as the same ControlNet in diffusers'
layout is; files of another layout or another model are refused in one line."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from sdruntime.manifest import read_manifest

from sdexport.cli import main
from sdexport.controlnet import load_controlnet, parse_controlnet
from sdexport.presets import build_controlnet_from_recipe, build_from_recipe, controlnet_presets, resolve_preset
from tests.exporter.ldm_layout import controlnet_to_ldm


def preset_controlnet(name: str):
    return build_controlnet_from_recipe(controlnet_presets()[name])


def ldm_file(folder, preset: str, prefix: str = "control_model.", extra: dict | None = None):
    """The preset's weights written as an original-layout single file, without a config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{preset}-ldm.safetensors"
    save_file({**controlnet_to_ldm(preset_controlnet(preset), prefix), **(extra or {})}, file)
    return file


@pytest.fixture(scope="module")
def cn_file(tmp_path_factory):
    return ldm_file(tmp_path_factory.mktemp("cn-file"), "tiny-controlnet")


@pytest.fixture(scope="module")
def from_file(tmp_path_factory, cn_file):
    out = tmp_path_factory.mktemp("cn-file-export") / "out"
    assert main(["convert", "tiny-sd", "-o", str(out), "--controlnet", f"edges={cn_file}"]) == 0
    return out


def graph_outputs(path, seed: int = 0) -> list[np.ndarray]:
    """The ControlNet graph run on seeded inputs: 2 latents of 8x8, 64x64 control images."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = {"batch": 2, "height": 8, "width": 8, "sequence": 77, "image_height": 64, "image_width": 64}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        feeds[spec.name] = rng.random(shape, dtype=np.float32) * (999.0 if spec.name == "timestep" else 1.0)
    return session.run(None, feeds)


def assert_same_graph_outputs(ours, theirs) -> None:
    for a, b in zip(graph_outputs(ours), graph_outputs(theirs), strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5


@pytest.mark.parametrize(
    "controlnet, pipeline, prefix",
    [("tiny-controlnet", "tiny-sd", "control_model."), ("tiny-sdxl-controlnet", "sdxl-tiny", "")],
)
def test_original_layout_loads_as_the_diffusers_controlnet(tmp_path, controlnet, pipeline, prefix):
    """SD 1.x and SDXL (label_emb, a 2-level hint block), with the control_model. prefix and without it."""
    source = parse_controlnet(str(ldm_file(tmp_path, controlnet, prefix)))
    assert source.kind == "ldm_file" and source.name == f"{controlnet}-ldm"
    unet = build_from_recipe(resolve_preset(pipeline)).unet
    model, expected = load_controlnet(source, unet.config), preset_controlnet(controlnet)
    assert dict(model.config) == dict(expected.config)
    ours, theirs = model.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == torch.float32 for k in theirs)


def test_a_whole_checkpoint_holding_the_controlnet_loads_its_control_model_part(tmp_path, tiny_pipe):
    extra = {"model.diffusion_model.out.2.bias": torch.zeros(4)}  # as lllyasviel's v1.0 files, SD beside it
    source = parse_controlnet(str(ldm_file(tmp_path, "tiny-controlnet", extra=extra)))
    model = load_controlnet(source, tiny_pipe.unet.config)
    assert torch.equal(
        model.controlnet_mid_block.weight, preset_controlnet("tiny-controlnet").controlnet_mid_block.weight
    )


def test_convert_exports_the_same_graph_as_the_diffusers_preset(from_file, tiny_controlnet32):
    manifest = read_manifest(from_file)
    manifest.verify()
    entry = manifest.components["controlnet/edges"]
    assert entry.path == "controlnet/edges/model.onnx" and entry.export_max_abs_diff < 1e-4
    assert (from_file / "controlnet" / "edges" / "config.json").is_file()
    assert_same_graph_outputs(from_file / entry.path, tiny_controlnet32 / entry.path)


def test_add_controlnet_takes_the_file(from_file, cn_file, tiny_controlnet32, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(from_file, out)
    assert main(["add-controlnet", str(out), f"again={cn_file}"]) == 0
    manifest = read_manifest(out)
    manifest.verify()
    assert_same_graph_outputs(
        out / manifest.components["controlnet/again"].path, tiny_controlnet32 / "controlnet/edges/model.onnx"
    )


def write_bad_file(folder, kind: str):
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        file = folder / "garbage.safetensors"
        save_file({"foo.weight": torch.zeros(2, 2), "bar.bias": torch.zeros(2)}, file)
    elif kind == "diffusers-without-config":
        file = folder / "diffusers.safetensors"
        save_file(preset_controlnet("tiny-controlnet").state_dict(), file)
    else:  # an SDXL ControlNet for an SD 1.x export
        file = ldm_file(folder, "tiny-sdxl-controlnet")
    return file


@pytest.mark.parametrize(
    "kind, message",
    [
        ("garbage", "is not a ControlNet: a single file needs the original layout's keys"),
        ("diffusers-without-config", "put the ControlNet's diffusers config.json beside the file"),
        ("another-model", "is for another model"),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, capsys, kind, message):
    file = write_bad_file(tmp_path / "files", kind)
    out = tmp_path / "out"
    assert main(["convert", "tiny-sd", "-o", str(out), "--controlnet", str(file)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdexport: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]


def test_add_controlnet_refuses_a_garbage_file_and_leaves_the_export(from_file, tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(from_file, out)
    before = (out / "sdexport.json").read_bytes()
    assert main(["add-controlnet", str(out), str(write_bad_file(tmp_path, "garbage"))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdexport: error:")]
    assert len(errors) == 1 and "is not a ControlNet" in errors[0]
    assert (out / "sdexport.json").read_bytes() == before
    assert sorted(p.name for p in (out / "controlnet").iterdir()) == ["edges"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
