"""`sdexport validate` and `convert --validate`: exit codes, tolerances, the fp16 blame, the report schema, ControlNets
and inpainting."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from sdruntime.manifest import load_schema, read_manifest

from sdexport import convert
from sdexport.cli import main
from sdexport.validate import REPORT_NAME, load_report_schema, psnr
from tests.conftest import REPO, _quiet_convert

# A weight of the tiny U-Net scaled so that the residual sum after it reaches ~1e5 (fp16 holds 65504).
OVERFLOW_MODULE = "down_blocks.0.resnets.0.conv2"
OVERFLOW_BLOCK = "/unet/down_blocks.0/resnets.0/"


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def validate_cli(source, folder: Path, report: Path, *extra: str) -> tuple[int, str, str, dict]:
    code, out, err = run_cli("validate", source, folder, "--json", report, *extra)
    return code, out, err, json.loads(report.read_text())


def schema_check(report: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, load_report_schema())


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sdexport:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def fp32_run(tiny32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("validate32")
    code, out, err, report = validate_cli("tiny-sd", tiny32, folder / "report.json", "--save-images", folder / "images")
    return code, out, err, report, folder / "images"


@pytest.fixture(scope="module")
def overflow_source(tmp_path_factory) -> Path:
    """tiny-sd with one U-Net convolution scaled so that an fp16 export overflows right after it."""
    import torch

    from sdexport.presets import build_from_recipe, resolve_preset

    pipe = build_from_recipe(resolve_preset("tiny-sd"))
    conv = pipe.unet.get_submodule(OVERFLOW_MODULE)
    with torch.no_grad():
        conv.weight *= 1e5
        conv.bias *= 1e5
    folder = tmp_path_factory.mktemp("overflow") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def overflow16(overflow_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overflow16") / "export"
    code, _, err = run_cli("convert", overflow_source, "--dtype", "fp16", "--components", "unet", "-o", out)
    assert code == 0, err
    return out


def test_fp32_export_passes(fp32_run):
    code, out, _, report, _ = fp32_run
    assert code == 0 and report["ok"] and report["failures"] == []
    assert set(report["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, entry in report["components"].items():
        assert entry["limits"] == {"max_abs": 1e-4, "relative_l2": None}, name
        assert entry["sha256_ok"] and entry["finite"]
        assert 0 < entry["max_abs"] <= 1e-4, (name, entry["max_abs"])
    for mode in ("text2img", "img2img"):
        e2e = report["end_to_end"][mode]
        assert e2e["skipped"] is None and e2e["min_psnr_db"] == 45
        assert 45 <= e2e["psnr_db"] <= 100 and e2e["latent_max_abs"] < 1e-3, (mode, e2e)
    assert out.strip().endswith("result: ok")


def test_every_shape_is_checked(fp32_run):
    _, out, _, report, _ = fp32_run
    unet = report["components"]["unet"]["cases"]
    assert {c["batch"] for c in unet} == {1, 2}
    assert len({(c["height"], c["width"]) for c in unet}) == 2
    assert len({c["timestep"] for c in unet}) == 2
    assert max(c["timestep"] for c in unet) > 500 > min(c["timestep"] for c in unet)
    ids = report["components"]["text_encoder"]["cases"][0]["inputs"]["input_ids"]
    assert ids == [1, 77]
    assert all(c["label"] in out for c in unet)


def test_report_follows_its_schema(fp32_run):
    _, _, _, report, _ = fp32_run
    schema_check(report)
    assert report["provider"] == "CPUExecutionProvider"
    assert {"sdexport", "torch", "diffusers", "onnxruntime"} <= set(report["versions"])
    assert report["settings"]["scheduler"] == "pndm" and report["settings"]["steps"] == 10


def test_save_images_side_by_side(fp32_run):
    _, _, _, report, images = fp32_run
    for mode in ("text2img", "img2img"):
        path = Path(report["end_to_end"][mode]["image"])
        assert path.parent == images and path.is_file()
        sheet = Image.open(path)
        assert sheet.size == (3 * report["settings"]["width"], report["settings"]["height"])


def test_perturbed_unet_weight_fails(tiny32, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny32, folder)
    path = folder / "unet" / "model.onnx"
    model = onnx.load(str(path))
    weight = max(
        (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: np.prod(t.dims)
    )
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.05), weight.name))
    onnx.save(model, str(path))

    code, out, err, report = validate_cli("tiny-sd", folder, tmp_path / "report.json", "--steps", "2")
    assert code == 1
    unet = report["components"]["unet"]
    assert not unet["ok"] and not unet["sha256_ok"]
    assert any("sha256" in p for p in unet["problems"])
    assert unet["max_abs"] > 1e-4 and unet["finite"]  # the numbers are still computed
    assert all(report["components"][c]["ok"] for c in ("text_encoder", "vae_decoder", "vae_encoder"))
    assert error_line(err).startswith("sdexport: validation failed: unet (")
    assert any(line.startswith("unet ") and line.endswith("FAIL") for line in out.splitlines())
    schema_check(report)


def test_fp16_uses_relative_error(tiny16, tmp_path):
    code, out, err, report = validate_cli("tiny-sd", tiny16, tmp_path / "report.json", "--steps", "4")
    assert code == 0, err
    for name, entry in report["components"].items():
        assert entry["dtype"] == "fp16"
        assert entry["limits"] == {"max_abs": None, "relative_l2": 1e-2}, name
        assert 0 < entry["relative_l2"] <= 1e-2 and entry["max_abs"] > 0, (name, entry)
    for e2e in report["end_to_end"].values():
        assert e2e["min_psnr_db"] == 30 and e2e["psnr_db"] >= 30
    assert "rel L2 <= 1e-02" in out
    schema_check(report)


def test_fp16_overflow_names_the_node(overflow_source, overflow16, tmp_path):
    code, out, err, report = validate_cli(overflow_source, overflow16, tmp_path / "report.json")
    assert code == 1
    unet = report["components"]["unet"]
    assert not unet["finite"] and not unet["ok"]
    blame = unet["first_bad_node"]
    assert blame["node"].startswith(OVERFLOW_BLOCK), blame
    assert blame["out_of_fp16_range"] and blame["fp32_max_value"] > 65504
    assert f"{OVERFLOW_BLOCK}conv2/Conv" in blame["suggested_fp32_nodes"]
    assert f"first fp16 node out of tolerance: {blame['node']}" in out
    assert report["end_to_end"]["text2img"]["skipped"]  # only the U-Net was exported
    schema_check(report)


def test_convert_validate_keeps_a_failed_export_aside(overflow_source, tmp_path):
    out = tmp_path / "export"
    code, _, err = run_cli(
        "convert", overflow_source, "--dtype", "fp16", "--components", "unet", "--validate", "-o", out
    )
    assert code == 1 and not out.exists()
    kept = list(tmp_path.glob(".export.tmp-*"))
    assert len(kept) == 1 and str(kept[0]) in error_line(err)
    report = json.loads((kept[0] / REPORT_NAME).read_text())
    assert not report["ok"] and report["components"]["unet"]["first_bad_node"]["node"].startswith(OVERFLOW_BLOCK)
    read_manifest(kept[0]).verify()
    assert not (kept[0] / ".convert.lock").exists()


def test_convert_validate_passes(tmp_path):
    out = tmp_path / "export"
    code, stdout, err = run_cli("convert", "tiny-sd", "--components", "unet,vae_decoder", "--validate", "-o", out)
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert json.loads((out / REPORT_NAME).read_text())["ok"]
    assert "result: ok" in err and not list(tmp_path.glob(".export.tmp-*"))


@pytest.mark.slow
def test_auto_fp32_fallback(overflow_source, tmp_path):
    out = tmp_path / "export"
    code, _, err = run_cli(
        "convert", overflow_source, "--dtype", "fp16", "--components", "unet", "--auto-fp32-fallback", "-o", out
    )
    assert code == 0, err
    unet = read_manifest(out).components["unet"]
    notes = list(unet.notes)
    assert notes[0].startswith("--auto-fp32-fallback kept") and f"{OVERFLOW_BLOCK}conv2/Conv" in notes[0]
    # node by node while precision.to_fp16 casts tensors between kept nodes to fp16; else the whole U-Net
    assert f"{OVERFLOW_BLOCK}conv2/Conv" in unet.fp32_nodes or unet.dtype == "fp32"
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["ok"] and report["fp32_fallback"]["unet"] == notes
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(read_manifest(out).to_json(), load_schema())
    read_manifest(out).verify()


def test_auto_fp32_fallback_needs_fp16(tmp_path):
    code, _, err = run_cli("convert", "tiny-sd", "--auto-fp32-fallback", "-o", tmp_path / "out")
    assert code == 2 and "add --dtype fp16" in error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--scheduler", "heun"], "unknown scheduler 'heun'"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "1"], "--steps 1 at strength 0.75 gives the image runs no step to take: give --steps 2 or more"),
        (["--atol", "-1"], "--atol must be positive"),
        (["--height", "0"], "--height must be positive"),
        (["--width", "40"], "width 40 is not a positive multiple of 16, this export's size multiple"),
        (["--controlnet", "edges=tiny-controlnet"], "has no ControlNet named 'edges' (it has none)"),
        (["--controlnet", "edges=no/such/folder"], "no such folder, file or ControlNet preset"),
    ],
)
def test_bad_options_exit_2(tiny32, args, says):
    code, _, err = run_cli("validate", "tiny-sd", tiny32, *args)
    assert code == 2 and says in error_line(err)


def test_end_to_end_prompt_and_size(tiny32, tmp_path):
    code, out, err, report = validate_cli(
        "tiny-sd",
        tiny32,
        tmp_path / "report.json",
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "",
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "3",
        "--save-images",
        tmp_path / "images",
    )
    assert code == 0, err
    settings = report["settings"]
    assert (settings["prompt"], settings["negative_prompt"], settings["height"], settings["width"]) == (
        "a red circle",
        "",
        32,
        48,
    )
    for mode in ("text2img", "img2img"):
        assert report["end_to_end"][mode]["ok"]
        assert Image.open(report["end_to_end"][mode]["image"]).size == (3 * 48, 32)  # drawn at that size
    schema_check(report)


def test_not_an_export_exits_2(tmp_path):
    code, _, err = run_cli("validate", "tiny-sd", tmp_path)
    assert code == 2 and "is not an sdexport export" in error_line(err)


def test_export_of_another_model_exits_2(tiny32, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny32, folder)
    manifest = json.loads((folder / "sdexport.json").read_text())
    manifest["components"]["unet"]["inputs"][2]["shape"][2] = 1024  # encoder_hidden_states' width
    (folder / "sdexport.json").write_text(json.dumps(manifest))
    code, _, err = run_cli("validate", "tiny-sd", folder)
    assert code == 2 and "was not exported from tiny-sd" in error_line(err)


def test_psnr_is_capped_at_100_db():
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert psnr(image, image) == 100.0
    other = image.copy()
    other[0, 0, 0] += 1
    assert 40 < psnr(image, other) < 100


@pytest.mark.parametrize("target", ["generic", "cuda"])
def test_fallback_rebuild_writes_the_graph_convert_writes(tmp_path, target):
    """The fp32 fallback and convert share one export path: same options, byte-identical graph."""
    import hashlib

    from sdexport.fp32_fallback import rebuild_component
    from sdexport.load import load_source
    from sdexport.specs import set_attention
    from sdexport.targets import EXPORT_TARGETS

    out = convert("tiny-sd", tmp_path / "export", dtype="fp16", target=target, components=["unet"], log=lambda s: None)
    before = hashlib.sha256((out / "unet" / "model.onnx").read_bytes()).hexdigest()
    src = load_source("tiny-sd")
    set_attention(src.pipe, EXPORT_TARGETS[target].attention)
    rebuild_component("unet", src.pipe, out, [], "rebuilt with no extra fp32 nodes")
    assert hashlib.sha256((out / "unet" / "model.onnx").read_bytes()).hexdigest() == before


# -- ControlNets and inpainting -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_export(tmp_path_factory) -> Path:
    """tiny-sd with the tiny-controlnet preset as controlnet/edges, exported once for this module."""
    return _quiet_convert(
        "tiny-sd", tmp_path_factory.mktemp("controlnet") / "export", controlnets=["edges=tiny-controlnet"]
    )


@pytest.fixture(scope="module")
def other_controlnet(tmp_path_factory) -> Path:
    """The tiny-controlnet preset's layout with another seed, as a diffusers folder: not the exported ControlNet."""
    from sdexport.presets import build_controlnet_from_recipe

    root = tmp_path_factory.mktemp("other-controlnet")
    recipe = json.loads((REPO / "models" / "tiny-controlnet" / "recipe.json").read_text())
    (root / "recipe").mkdir()
    other = {**recipe, "seed": recipe["seed"] + 1, "for": str(REPO / "models" / recipe["for"])}
    (root / "recipe" / "recipe.json").write_text(json.dumps(other))
    build_controlnet_from_recipe(root / "recipe").save_pretrained(root / "other")
    return root / "other"


def left_third(path: str) -> np.ndarray:
    """diffusers' picture in a --save-images sheet."""
    sheet = np.asarray(Image.open(path))
    return sheet[:, : sheet.shape[1] // 3]


def test_controlnet_is_checked_per_component_and_end_to_end(controlnet_export, tmp_path):
    code, out, err, report = validate_cli(
        "tiny-sd",
        controlnet_export,
        tmp_path / "report.json",
        "--steps",
        "2",
        "--controlnet",
        "edges=tiny-controlnet",
        "--save-images",
        tmp_path / "images",
    )
    assert code == 0, err
    entry = report["components"]["controlnet/edges"]
    assert entry["ok"] and entry["skipped"] is None and entry["limits"] == {"max_abs": 1e-4, "relative_l2": None}
    assert 0 < entry["max_abs"] <= 1e-4 and entry["finite"]
    assert {c["batch"] for c in entry["cases"]} == {1, 2} and len({c["timestep"] for c in entry["cases"]}) == 2
    case = entry["cases"][0]
    assert case["inputs"]["controlnet_cond"] == [1, 3, case["height"], case["width"]]
    assert list(case["outputs"])[-1] == "mid_block_res_sample"
    assert len(case["outputs"]) == case["inputs"]["conditioning_scale"][0]  # one scale per residual
    assert any(line.startswith("controlnet/edges ") and line.endswith(" ok") for line in out.splitlines())
    # the U-Net's residual inputs: left to their zero defaults, and random in one case per batch and size
    fed = [c for c in report["components"]["unet"]["cases"] if "mid_block_additional_residual" in c["inputs"]]
    assert len(fed) == 4 and all(c["label"].endswith("+residuals") for c in fed)
    drawn = report["end_to_end"]["controlnet"]
    assert (drawn["mode"], drawn["controlnet"], drawn["skipped"]) == ("text2img", "edges", None)
    assert drawn["ok"] and drawn["psnr_db"] >= 45, drawn
    plain = report["end_to_end"]["text2img"]
    assert (
        psnr(left_third(plain["image"]), left_third(drawn["image"])) < 45
    )  # the ControlNet changed diffusers' picture
    assert "(text2img, ControlNet edges)" in out
    schema_check(report)


def test_controlnet_without_its_model_is_not_checked(controlnet_export):
    from sdexport.validate import validate

    report = validate("tiny-sd", controlnet_export, steps=2)
    assert report.ok, report["failures"]
    entry = report["components"]["controlnet/edges"]
    assert entry["skipped"] == "not checked: no PyTorch ControlNet given (--controlnet edges=PATH)"
    assert entry["cases"] == [] and entry["ok"]
    assert report["end_to_end"]["controlnet"]["skipped"] == "no --controlnet NAME=PATH given"
    schema_check(report.to_json())


def test_a_wrong_controlnet_fails(controlnet_export, other_controlnet, tmp_path):
    code, out, err, report = validate_cli(
        "tiny-sd",
        controlnet_export,
        tmp_path / "report.json",
        "--steps",
        "2",
        "--controlnet",
        f"edges={other_controlnet}",
    )
    assert code == 1
    entry = report["components"]["controlnet/edges"]
    assert not entry["ok"] and entry["sha256_ok"] and entry["finite"] and entry["max_abs"] > 1e-2
    assert all(report["components"][c]["ok"] for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder"))
    assert report["end_to_end"]["text2img"]["ok"] and not report["end_to_end"]["controlnet"]["ok"]
    assert error_line(err).startswith("sdexport: validation failed: controlnet/edges (")
    schema_check(report)


def test_inpainting_export_draws_an_inpainting_picture(tiny_inpaint32, tmp_path):
    code, out, err, report = validate_cli("tiny-sd-inpaint", tiny_inpaint32, tmp_path / "report.json", "--steps", "3")
    assert code == 0, err
    for case in report["components"]["unet"]["cases"]:
        assert case["inputs"]["sample"][1] == 9  # latents, mask and masked-image latents
    for mode in ("text2img", "img2img"):
        assert report["end_to_end"][mode]["skipped"] == "a 9-channel U-Net inpaints only: see inpaint"
    drawn = report["end_to_end"]["inpaint"]
    assert (drawn["mode"], drawn["controlnet"], drawn["skipped"]) == ("inpaint", None, None)
    assert drawn["ok"] and drawn["psnr_db"] >= 45 and drawn["latent_max_abs"] < 1e-3, drawn
    assert "controlnet" not in report["end_to_end"]
    schema_check(report)
