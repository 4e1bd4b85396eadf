"""`sdruntime` on bad input: one line, a non-zero exit, and what to do about it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sdruntime.cli import main
from sdruntime.manifest import sha256_file


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sdruntime:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def copy32(tiny32, tmp_path) -> Path:
    return Path(shutil.copytree(tiny32, tmp_path / "export"))


def rewrite_model(folder: Path, component: str, change, update_manifest: bool) -> None:
    """Apply `change` to a component's first float initializer; optionally record the new sha256."""
    path = folder / component / "model.onnx"
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init)), init.name))
    onnx.save(model, str(path))
    if update_manifest:
        manifest = json.loads((folder / "sdexport.json").read_text())
        entry = manifest["components"][component]["files"][0]
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
        (folder / "sdexport.json").write_text(json.dumps(manifest))


def test_generates_a_png(capsys, tiny32, tmp_path):
    code = main(["generate", str(tiny32), "a blue square", "--steps", "2", "--seed", "1", "-o", str(tmp_path / "a.png")])
    assert code == 0 and (tmp_path / "a.png").is_file()


def test_numbered_files_for_several_images(tiny32, tmp_path):
    code = main(["generate", str(tiny32), "x", "--steps", "2", "-n", "2", "-o", str(tmp_path / "b.png")])
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["b-0.png", "b-1.png"]


def test_not_an_export(capsys, tmp_path):
    code, err = run(capsys, "generate", str(tmp_path), "x")
    assert code == 2 and "is not an sdexport export" in error_line(err)


def test_missing_model_file(capsys, copy32):
    (copy32 / "unet" / "model.onnx").unlink()
    code, err = run(capsys, "generate", str(copy32), "x")
    assert code == 2 and "unet/model.onnx is missing" in error_line(err)


def test_corrupted_model_file(capsys, copy32):
    rewrite_model(copy32, "unet", lambda w: w * 1.01, update_manifest=False)
    code, err = run(capsys, "generate", str(copy32), "x")
    assert code == 2
    line = error_line(err)
    assert "unet/model.onnx" in line and ("sha256" in line or "bytes" in line) and "sdexport convert" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--height", "72"], "height 72 is not a positive multiple of 16"),
        (["--width", "0"], "width 0 is not a positive multiple of 16"),
        (["--scheduler", "heun"], "unknown scheduler 'heun'"),
        (["--steps", "0"], "num_inference_steps must be a positive integer"),
        (["--image", "INIT", "--strength", "1.5"], "strength must be in (0, 1]"),
        (["--image", "INIT", "--strength", "0"], "strength must be in (0, 1]"),
        (["--image", "NOTANIMAGE"], "cannot read the init image"),
        (["--provider", "cuda"], "CUDAExecutionProvider is not installed"),
        (["--provider", "metal"], "unknown provider 'metal'"),
        (["--seed", str(2**32)], "seed"),
    ],
)
def test_bad_generate_arguments(capsys, tiny32, tmp_path, args, says):
    init = tmp_path / "init.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    (tmp_path / "bad.png").write_text("not an image")
    args = [a.replace("NOTANIMAGE", str(tmp_path / "bad.png")).replace("INIT", str(init)) for a in args]
    code, err = run(capsys, "generate", str(tiny32), "x", "--steps", "2", *args, "-o", str(tmp_path / "o.png"))
    assert code == 2
    assert says in error_line(err)


def test_nan_output_names_the_component(capsys, copy32):
    rewrite_model(copy32, "vae_decoder", lambda w: np.full_like(w, np.nan), update_manifest=True)
    code, err = run(capsys, "generate", str(copy32), "x", "--steps", "2")
    line = error_line(err)
    assert code == 2 and "vae_decoder produced NaN or Inf" in line and "--keep-fp32 vae_decoder" in line


def test_provider_list_falls_back(capsys, tiny32, tmp_path):
    code, err = run(capsys, "generate", str(tiny32), "x", "--steps", "1", "--provider",
                    "CUDAExecutionProvider,CPUExecutionProvider", "-o", str(tmp_path / "p.png"))
    assert code == 0 and "unet: CPUExecutionProvider" in err


def test_interpolate_pairwise_and_grid(tiny32, tmp_path):
    assert main(["interpolate", str(tiny32), "--prompt", "a", "--prompt", "b", "--frames", "3",
                 "--steps", "2", "-o", str(tmp_path / "pair")]) == 0
    assert len(list((tmp_path / "pair").glob("frame-*.png"))) == 3
    from PIL import Image

    assert Image.open(tmp_path / "pair" / "sheet.png").size == (3 * 64, 64)
    assert main(["interpolate", str(tiny32), *sum([["--prompt", p] for p in "abcd"], []), "--grid", "2",
                 "--steps", "2", "-o", str(tmp_path / "grid")]) == 0
    assert Image.open(tmp_path / "grid" / "sheet.png").size == (128, 128)


def test_interpolate_needs_two_or_four_prompts(capsys, tiny32):
    code, err = run(capsys, "interpolate", str(tiny32), "--prompt", "a")
    assert code == 2 and "needs two --prompt" in error_line(err)


def test_size_other_than_a_static_export(capsys, tmp_path):
    from sdexport import convert

    out = convert("tiny-sd", tmp_path / "static", static=True, height=64, width=64, components=["text_encoder", "unet", "vae_decoder"],
                  check=False, log=lambda s: None)
    code, err = run(capsys, "generate", str(out), "x", "--height", "96", "--steps", "1")
    assert code == 2 and "this export is static at 64x64" in error_line(err)
