"""The runtime installs and draws in a fresh venv holding only `runtime/` and pytest: no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"

SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    for heavy in ("torch", "diffusers", "transformers", "onnx", "optimum"):
        try:
            importlib.import_module(heavy)
        except ImportError:
            continue
        raise SystemExit(f"{heavy} is importable in the runtime-only venv")
    from sdruntime import StableDiffusionPipeline
    from sdruntime.schedulers import SCHEDULERS
    pipe = StableDiffusionPipeline.load(sys.argv[1])
    for name in SCHEDULERS:
        result = pipe("a red circle on a blue background", num_inference_steps=3, seed=0, scheduler=name)
        result.save(f"{sys.argv[2]}/{name}.png")
    pipe("a red circle", image=f"{sys.argv[2]}/pndm.png", strength=0.5, num_inference_steps=4, seed=1)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"))
    assert not loaded, loaded
    print("drew", len(SCHEDULERS), "images")
    """
)


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(RUNTIME), "pytest"], check=True, timeout=600)
    return venv


def test_runtime_venv_has_no_torch_and_draws_with_every_scheduler(runtime_venv, tiny32, tmp_path):
    python = runtime_venv / "bin" / "python"
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert not names & {"torch", "diffusers", "transformers", "onnx", "optimum", "sdexport"}
    for heavy in ("torch", "diffusers", "transformers"):
        probe = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr
    run = subprocess.run([str(python), "-c", SCRIPT, str(tiny32), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "drew 8 images" in run.stdout
    assert len(list(tmp_path.glob("*.png"))) == 8


def test_sdruntime_cli_in_runtime_venv(runtime_venv, tiny32, tmp_path):
    out = tmp_path / "cli.png"
    run = subprocess.run(
        [
            str(runtime_venv / "bin" / "sdruntime"),
            "generate",
            str(tiny32),
            "a green star",
            "--steps",
            "2",
            "--seed",
            "3",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.is_file()
