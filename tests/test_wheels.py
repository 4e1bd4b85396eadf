"""The wheels built from this repository work without it: installed into a fresh venv and run from another
folder, `sdexport` finds its shipped models (the shapes preset, the single-file configs, the CLIP tokenizer)
and `sdruntime` draws what the checkout's runtime draws."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / ".ci" / "constraints.txt"
PROMPT = "a red circle on a blue background, center"
NOT_SOURCE = (
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "out",
    "exports",
    ".gpu",
    "__pycache__",
    "*.egg-info",
    ".*_cache",
)


def run(args: list, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("SDEXPORT_MODELS", None)
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv holding only the two wheels built from the repository (and their dependencies, pinned)."""
    root = tmp_path_factory.mktemp("wheels")
    # built from a copy: setuptools reuses a source tree's build/ folder, where a removed module would linger
    source = shutil.copytree(REPO, root / "source", ignore=shutil.ignore_patterns(*NOT_SOURCE))
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "dist", source, source / "runtime"], root
    )
    wheels = sorted((root / "dist").glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["sdexport", "sdexport_runtime"]
    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv], root)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "-c", CONSTRAINTS]
    run([*pip, "torch"], root)  # first, alone: the constraints pin it to the machine's CPU wheel
    run([*pip, *wheels], root)
    return venv


@pytest.fixture(scope="session")
def away(tmp_path_factory) -> Path:
    """A working folder outside the checkout."""
    return tmp_path_factory.mktemp("away-from-checkout")


def test_wheel_holds_the_shipped_models_and_no_repository_path(wheel_venv, away):
    from sdexport.presets import available_presets

    probe = (
        "import sdexport, sdexport.presets as p, sdexport.single_file as s; "
        "print(sdexport.__file__); print(p.models_dir()); print(sorted(p.available_presets())); "
        "print(s.config_folder('sd1', None)); print(s.config_folder('sd2', None))"
    )
    lines = run([wheel_venv / "bin" / "python", "-c", probe], away).stdout.splitlines()
    package, models, presets, sd1, sd2 = lines
    assert Path(package).is_relative_to(wheel_venv) and not Path(package).is_relative_to(REPO)
    assert Path(models) == Path(package).parent / "models"
    assert presets == str(sorted(available_presets())) and "shapes" in presets  # the checkout's, every one
    for folder in (Path(sd1), Path(sd2)):
        assert folder.is_relative_to(models)
        assert (folder / "unet" / "config.json").is_file() and (folder / "model_index.json").is_file()
    assert (Path(models) / "clip-tokenizer" / "vocab.json").is_file()
    assert not (Path(models) / "shapes" / "logs").exists()  # training logs stay in the repository


def test_wheels_convert_shapes_and_draw_the_checkouts_picture(wheel_venv, away):
    """README's two commands with the installed wheels, from a folder away from the checkout; the picture
    equals the checkout runtime's for the same export, prompt and seed."""
    from sdruntime import StableDiffusionPipeline

    run([wheel_venv / "bin" / "sdexport", "convert", "shapes", "-o", away / "shapes"], away)
    run(
        [wheel_venv / "bin" / "sdruntime", "generate", away / "shapes", PROMPT, "--seed", "0", "-o", "circle.png"], away
    )
    drawn = np.asarray(Image.open(away / "circle.png"))
    expected = np.asarray(StableDiffusionPipeline.load(away / "shapes")(PROMPT, seed=0).images[0])
    assert drawn.shape == expected.shape and drawn.std() > 0
    assert np.array_equal(drawn, expected)


@pytest.mark.slow
def test_wheels_convert_a_full_size_sd1_single_file_with_the_shipped_configs(wheel_venv, away, tmp_path):
    """An SD 1.5-sized checkpoint (random weights, the original layout, fp16 safetensors: 2.1 GB) converts
    with the configs inside the wheel alone (convert compares each graph with PyTorch as it writes it)."""
    import torch
    from safetensors.torch import save_file

    from sdexport.presets import build_from_recipe, models_dir

    from .exporter.ldm_layout import pipeline_to_ldm

    pipe = build_from_recipe(models_dir() / "sd15-random")
    checkpoint = tmp_path / "sd15-random.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in pipeline_to_ldm(pipe, "sd1").items()}, checkpoint)
    del pipe
    out = away / "sd15-single-file"
    done = run([wheel_venv / "bin" / "sdexport", "convert", checkpoint, "-o", out], away, timeout=3600)
    assert f"loaded single_file '{checkpoint}'" in done.stderr, done.stderr  # no --config: the wheel's configs
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (out / component / "model.onnx").is_file()
