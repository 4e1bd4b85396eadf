"""ONNX Runtime's OpenVINO provider: its pictures against the CPU provider's, its options and its refusals.

The drawing tests need onnxruntime-openvino, which replaces onnxruntime's module, so they run in their own
torch-free venv (.ci/run's OpenVINO step) on exports that the main venv made beforehand:
SDEXPORT_OPENVINO_EXPORTS names a folder holding `tiny-sd/` and `sdxl-tiny/` (generic, fp32) and
`tiny-sd-tensorrt/` (`--target tensorrt`). Where the provider is absent they are skipped, unless
SDEXPORT_REQUIRE_OPENVINO=1 (set by .ci/run) makes that a failure.
The refusal tests run where the provider is absent: the main venv.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sdruntime import SessionSettings, StableDiffusionPipeline
from sdruntime.errors import UserError
from sdruntime.session import OPENVINO, resolve_providers

HAS_OPENVINO = OPENVINO in ort.get_available_providers()
REQUIRED = os.environ.get("SDEXPORT_REQUIRE_OPENVINO") == "1"
EXPORTS = os.environ.get("SDEXPORT_OPENVINO_EXPORTS")
PROMPT = "a red circle on a blue background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 pictures, in dB (inf when equal)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def openvino_exports() -> Path:
    """The exports folder, once the provider is known to be here; a skip or (in CI's step) a failure otherwise."""
    if not HAS_OPENVINO:
        why = f"{OPENVINO} is not installed (onnxruntime offers {', '.join(ort.get_available_providers())})"
        if REQUIRED:
            pytest.fail(f"SDEXPORT_REQUIRE_OPENVINO=1 but {why}")
        pytest.skip(why)
    if not EXPORTS:
        if REQUIRED:
            pytest.fail("SDEXPORT_REQUIRE_OPENVINO=1 but SDEXPORT_OPENVINO_EXPORTS names no exports folder")
        pytest.skip("SDEXPORT_OPENVINO_EXPORTS names no exports folder (made by the main venv: see .ci/run)")
    return Path(EXPORTS)


def draw(folder: Path, provider: str, settings: SessionSettings | None = None, **kw) -> np.ndarray:
    pipe = StableDiffusionPipeline.load(folder, provider=provider, settings=settings or SessionSettings())
    assert set(pipe.component_providers.values()) == {OPENVINO if provider.startswith("openvino") else ort_cpu()}
    args = {"num_inference_steps": 3, "height": 64, "width": 64, "seed": 0, **kw}
    return np.asarray(pipe(PROMPT, **args).images[0])


def ort_cpu() -> str:
    return "CPUExecutionProvider"


@pytest.mark.parametrize(
    "model, kw",
    [
        ("tiny-sd", {}),
        ("tiny-sd", {"scheduler": "euler-a", "guidance_scale": 5.0, "num_images": 2, "seed": 3}),
        ("sdxl-tiny", {}),
        ("tiny-sd-tensorrt", {}),  # the tensorrt target's standard-op graphs (targets.py lets OpenVINO run them)
    ],
)
def test_pictures_match_the_cpu_provider(openvino_exports, model, kw):
    """The same request on the OpenVINO EP and on the CPU EP: pictures at >= 40 dB, while another seed is far."""
    folder = openvino_exports / model
    ours = draw(folder, "openvino", **kw)
    cpu = draw(folder, "cpu", **kw)
    assert psnr(ours, cpu) >= 40, f"{model}: {psnr(ours, cpu):.1f} dB"
    other = draw(folder, "cpu", **{**kw, "seed": kw.get("seed", 0) + 1})
    assert psnr(ours, other) < 30  # the measure tells pictures apart: a wrong seed or a broken graph fails above


def test_model_cache_and_threads_reach_the_provider(openvino_exports, tmp_path):
    """openvino_cache_dir receives OpenVINO's compiled blobs; the export's folder is left alone then."""
    folder = openvino_exports / "tiny-sd"
    settings = SessionSettings(openvino_cache_dir=str(tmp_path / "cache"), intra_op_threads=1)
    draw(folder, "openvino", settings, num_inference_steps=1)
    assert len(list((tmp_path / "cache").glob("*.blob"))) == 3  # text encoder, U-Net, VAE decoder


def test_missing_device_refused(openvino_exports):
    """A device this machine lacks is refused in one line, not run on the CPU EP behind the user's back."""
    from onnxruntime.capi._pybind_state import get_available_openvino_device_ids

    missing = next(d for d in ("NPU", "GPU", "GPU.7") if d not in get_available_openvino_device_ids())
    with pytest.raises(UserError, match=f"OpenVINO could not start with device_type={missing} .*openvino:CPU"):
        draw(openvino_exports / "tiny-sd", f"openvino:{missing}", num_inference_steps=1)


def test_fallback_list_falls_back(openvino_exports):
    """In a list of providers the next one takes over where OpenVINO cannot start: the list asked for that."""
    from onnxruntime.capi._pybind_state import get_available_openvino_device_ids

    missing = next(d for d in ("NPU", "GPU") if d not in get_available_openvino_device_ids())
    for providers in ([(OPENVINO, {"device_type": missing}), "cpu"], [f"openvino:{missing}", "cpu"]):
        pipe = StableDiffusionPipeline.load(openvino_exports / "tiny-sd", provider=providers)
        pipe(PROMPT, num_inference_steps=1, height=64, width=64)
        assert set(pipe.component_providers.values()) == {"CPUExecutionProvider"}
    assert resolve_providers(["openvino:CPU", "cpu"], "generic") == [
        (OPENVINO, {"device_type": "CPU"}),
        "CPUExecutionProvider",
    ]


def test_precision_reaches_the_provider(openvino_exports):
    """openvino_precision is the EP's own option: FP16, which OpenVINO's CPU plugin refuses, is refused."""
    settings = SessionSettings(openvino_precision="FP16", openvino_device="CPU")
    with pytest.raises(UserError, match="could not start with device_type=CPU, precision=FP16"):
        draw(openvino_exports / "tiny-sd", "openvino", settings, num_inference_steps=1)


def test_cpu_target_refused_on_openvino(openvino_exports):
    """A cpu export's NCHWc graphs do not load in OpenVINO (measured): the target table refuses them first."""
    with pytest.raises(UserError, match="targets 'cpu' and cannot run on OpenVINOExecutionProvider.*--target generic"):
        resolve_providers("openvino", "cpu")


@pytest.mark.skipif(HAS_OPENVINO, reason="the OpenVINO provider is installed here")
def test_refused_without_the_provider():
    """Without onnxruntime-openvino, asking for it names the package and how it replaces onnxruntime."""
    with pytest.raises(UserError) as refusal:
        resolve_providers("openvino", "generic")
    message = str(refusal.value)
    assert "\n" not in message
    assert f"{OPENVINO} is not installed" in message
    assert (
        'pip install "sdexport-runtime[openvino]"' in message
        and "--force-reinstall --no-deps onnxruntime-openvino" in message
    )


@pytest.mark.skipif(HAS_OPENVINO, reason="the OpenVINO provider is installed here")
def test_cli_refuses_without_the_provider(tiny32, tmp_path, capsys):
    """`sdruntime generate --provider openvino` exits 2 with the one line, before drawing anything."""
    from sdruntime.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", str(tiny32), PROMPT, "--provider", "openvino", "-o", str(out)]) == 2
    assert not out.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "OpenVINOExecutionProvider is not installed" in lines[0], lines


def test_provider_options_from_the_settings(tmp_path):
    """The settings become the EP's own option names; options given with the provider win over them."""
    from types import SimpleNamespace

    from sdruntime.session import provider_options

    folder = tmp_path / "export"
    manifest = SimpleNamespace(folder=folder)  # OpenVINO's options read only the export's folder
    settings = SessionSettings(openvino_device="NPU", openvino_precision="ACCURACY", intra_op_threads=3)
    [(name, options)] = provider_options([OPENVINO], manifest, "unet", settings)
    assert name == OPENVINO
    assert options == {
        "device_type": "NPU",
        "cache_dir": str(folder / "openvino_cache"),
        "precision": "ACCURACY",
        "num_of_threads": "3",
    }
    given = (OPENVINO, {"device_type": "GPU", "cache_dir": str(tmp_path / "mine")})
    [(_, options)] = provider_options([given], manifest, "unet", SessionSettings())
    assert options == {"device_type": "GPU", "cache_dir": str(tmp_path / "mine")}
