"""`sdexport validate` and `convert --validate` on SD3 and Flux exports: every component against PyTorch on the
pipelines' own inputs, text-to-image, image-to-image and inpainting against diffusers' SD3 and Flux pipelines, and
a tampered transformer that the report must flag."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sdruntime.errors import InvalidArgument
from sdruntime.manifest import MANIFEST_NAME, read_manifest, sha256_file

from sdexport import convert
from sdexport.errors import SdexportError
from sdexport.validate import REPORT_NAME, load_report_schema, validate

SIZE = {"height": 64, "width": 64}  # Flux's default (256) would quadruple the VAE's work
MODES = ("text2img", "img2img", "inpaint")


def _validate(source: str, folder: Path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return validate(source, folder, steps=2, **SIZE, **options).to_json()


@pytest.fixture(scope="module")
def sd3_report(tmp_path_factory) -> dict:
    """`convert --validate` on sd3-tiny (its default size, 64 px): the report it leaves in the export."""
    out = tmp_path_factory.mktemp("sd3") / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert("sd3-tiny", out, validate=True, log=lambda line: None)
    return json.loads((out / REPORT_NAME).read_text())


@pytest.fixture(scope="module")
def flux_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux") / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert("flux-tiny", out, log=lambda line: None)


@pytest.fixture(scope="module")
def flux_report(flux_export) -> dict:
    return _validate("flux-tiny", flux_export)


def schema_check(report: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, load_report_schema())


def assert_passes(report: dict, components: set[str]) -> None:
    assert report["ok"] and report["failures"] == [], report["failures"]
    assert set(report["components"]) == components
    for name, entry in report["components"].items():
        assert entry["ok"] and entry["sha256_ok"] and entry["finite"], name
        assert entry["limits"] == {"max_abs": 1e-4, "relative_l2": None}, name
        assert 0 < entry["max_abs"] <= 1e-4, (name, entry["max_abs"])
    assert not report["full_size"] and 0 < report["unet_parameters"] < 1_000_000  # the transformer's
    for mode in MODES:
        run = report["end_to_end"][mode]
        assert run["mode"] == mode and run["skipped"] is None and run["ok"], (mode, run)
        assert 45 <= run["psnr_db"] <= 100 and run["latent_max_abs"] < 1e-3, (mode, run)
    assert report["settings"]["scheduler"] == "flow-match-euler"
    schema_check(report)


def test_sd3_convert_validate_passes(sd3_report):
    assert_passes(
        sd3_report,
        {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder"},
    )
    assert sd3_report["settings"]["guidance_scale"] == 7.0  # StableDiffusion3Pipeline's default
    cases = {c["label"]: c for c in sd3_report["components"]["transformer"]["cases"]}
    assert len(cases) == 8  # batch 1 and 2 x two sizes x two timesteps
    timesteps = sd3_report["settings"]["timesteps"]
    assert timesteps[0] == 1000.0 and 0 < timesteps[1] < 100  # sigma x 1000
    first = cases["b2 64x64 t=1000"]["inputs"]
    assert first["hidden_states"] == [2, 16, 32, 32]
    assert first["encoder_hidden_states"] == [2, 77 + 256, 80]  # CLIP's 77 and T5's max_sequence_length
    t5 = sd3_report["components"]["text_encoder_3"]["cases"][0]["inputs"]["input_ids"]
    assert t5 == [1, 256]


def test_flux_validate_passes(flux_report):
    assert_passes(flux_report, {"text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder"})
    assert flux_report["settings"]["guidance_scale"] == 3.5  # FluxPipeline's default
    timesteps = flux_report["settings"]["timesteps"]
    assert timesteps[0] == 1.0 and 0 < timesteps[1] < 1  # sigma: the transformer scales it
    cases = flux_report["components"]["transformer"]["cases"]
    inputs = next(c["inputs"] for c in cases if c["label"].startswith("b2 32x64"))
    assert inputs["hidden_states"] == [2, 8 * 16, 64]  # 2x2 patches of 16-channel latents, packed
    assert inputs["img_ids"] == [8 * 16, 3] and inputs["txt_ids"] == [512, 3] and inputs["guidance"] == [2]
    assert flux_report["components"]["text_encoder_2"]["cases"][0]["inputs"]["input_ids"] == [1, 512]


def tamper(folder: Path) -> None:
    """Scale the transformer's largest weight by 1.05 and record the file's new hash, so only the numbers can
    tell."""
    path = folder / "transformer" / "model.onnx"
    model = onnx.load(str(path))
    weight = max(
        (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: np.prod(t.dims)
    )
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.05), weight.name))
    onnx.save(model, str(path))
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for entry in manifest["components"]["transformer"]["files"]:
        if entry["path"] == "transformer/model.onnx":
            entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_tampered_transformer_fails(flux_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(flux_export, folder)
    tamper(folder)
    read_manifest(folder).verify()  # the hashes agree: only the comparison with PyTorch can find it
    report = _validate("flux-tiny", folder, seed=1)
    assert not report["ok"]
    transformer = report["components"]["transformer"]
    assert not transformer["ok"] and transformer["sha256_ok"] and transformer["finite"]
    assert transformer["max_abs"] > 1e-4
    assert all(report["components"][c]["ok"] for c in ("text_encoder", "text_encoder_2", "vae_decoder"))
    assert any(f.startswith("transformer: ") and "max abs" in f for f in report["failures"])
    text2img = report["end_to_end"]["text2img"]
    assert text2img["latent_max_abs"] > 1e-3, text2img
    schema_check(report)


def test_unet_schedulers_are_refused(flux_export):
    with pytest.raises(InvalidArgument, match="^euler serves epsilon/v-prediction .* choose one of flow-match-euler$"):
        _validate("flux-tiny", flux_export, scheduler="euler")


def test_another_family_is_refused(flux_export):
    with pytest.raises(SdexportError, match="was not exported from tiny-sd: its family is flux, the source's sd1"):
        _validate("tiny-sd", flux_export)
