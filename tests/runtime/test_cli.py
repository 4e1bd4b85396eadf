"""`sdruntime` on bad input: one line, a non-zero exit, and what to do about it."""

from __future__ import annotations

import json
import re
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
    code = main(
        ["generate", str(tiny32), "a blue square", "--steps", "2", "--seed", "1", "-o", str(tmp_path / "a.png")]
    )
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
        (["--mask", "MASK"], "mask_image needs the image to inpaint: pass image too"),
        (["--image", "INIT", "--mask", "MISSING"], "cannot read the mask image"),
        (["--image", "INIT", "--mask", "NOTANIMAGE"], "cannot read the mask image"),
        (["--image", "INIT", "--mask", "SMALLMASK"], "mask_image is 32x32, the image 64x64"),
        (["--provider", "cuda"], "CUDAExecutionProvider is not installed"),
        (["--provider", "metal"], "unknown provider 'metal'"),
        (["--seed", str(2**32)], "seed"),
        (["--seed", str(2**32 - 1), "-n", "2"], "runs past 2**32 - 1"),
        (["--guidance", "nan"], "guidance_scale must be a finite number, got nan"),
        (["--guidance", "inf"], "guidance_scale must be a finite number, got inf"),
        (["--image", "INIT", "--strength", "nan"], "strength must be a finite number, got nan"),
        (["--scheduler", "ddim", "--eta", "nan"], "eta must be a finite number, got nan"),
        (["--scheduler-option", "foo=1"], "has no setting 'foo'"),
        (["--scheduler-option", "clip_sample"], "write KEY=VALUE, e.g. clip_sample=false"),
        (["--scheduler-option", "trained_betas=[0.1]"], "VALUE must be true, false, a number or a string"),
        (["--control", "INIT"], "this export has no ControlNet: add one with `sdexport add-controlnet"),
        (["--control", "INIT", "--guess-mode"], "this export has no ControlNet"),
        (["--control", "MISSING"], "cannot read the control image"),
        (["--control", "edges="], "--control edges=: name a control image, as [NAME=]IMAGE[:SCALE]"),
        (["--guess-mode"], "--guess-mode, --control-start and --control-end need --control [NAME=]IMAGE"),
        (["--control-end", "0.5"], "need --control [NAME=]IMAGE"),
    ],
)
def test_bad_generate_arguments(capsys, tiny32, tmp_path, args, says):
    init = tmp_path / "init.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    (tmp_path / "bad.png").write_text("not an image")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    files = {"NOTANIMAGE": "bad.png", "INIT": "init.png", "MASK": "mask.png", "SMALLMASK": "small.png"}
    files["MISSING"] = "missing.png"  # never written
    args = [str(tmp_path / files[a]) if a in files else a for a in args]
    code, err = run(capsys, "generate", str(tiny32), "x", "--steps", "2", *args, "-o", str(tmp_path / "o.png"))
    assert code == 2
    assert says in error_line(err)
    assert not (tmp_path / "o.png").exists()


def test_nan_output_of_an_fp32_export_says_it_is_damaged(capsys, copy32, tmp_path):
    rewrite_model(copy32, "vae_decoder", lambda w: np.full_like(w, np.nan), update_manifest=True)
    code, err = run(capsys, "generate", str(copy32), "x", "--steps", "2", "-o", str(tmp_path / "n.png"))
    line = error_line(err)
    assert code == 2 and "vae_decoder produced NaN or Inf" in line
    assert "fp32 graph or its weights are damaged" in line and "re-export" in line and "--no-verify" in line
    assert "fp16" not in line and not (tmp_path / "n.png").exists()


def test_nan_output_of_an_fp16_export_names_the_component_to_keep_in_fp32(capsys, tiny16, tmp_path):
    copy16 = Path(shutil.copytree(tiny16, tmp_path / "export16"))
    path = copy16 / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16 and len(t.dims) == 4)
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.inf), init.name))
    onnx.save(model, str(path))
    code, err = run(capsys, "generate", str(copy16), "x", "--steps", "2", "--no-verify", "-o", str(tmp_path / "n.png"))
    [line] = [line for line in err.splitlines() if line.startswith("sdruntime: error:")]  # after a warning
    assert "Traceback" not in err
    assert code == 2 and "vae_decoder produced NaN or Inf: its fp16 graph overflows" in line
    assert "--keep-fp32 vae_decoder" in line


def test_provider_list_falls_back(capsys, tiny32, tmp_path):
    code, err = run(
        capsys,
        "generate",
        str(tiny32),
        "x",
        "--steps",
        "1",
        "--provider",
        "CUDAExecutionProvider,CPUExecutionProvider",
        "--verbose",
        "-o",
        str(tmp_path / "p.png"),
    )
    assert code == 0 and "unet CPUExecutionProvider" in err


def test_quiet_unless_verbose(capsys, tiny32, tmp_path):
    code, err = run(capsys, "generate", str(tiny32), "x", "--steps", "1", "-o", str(tmp_path / "q.png"))
    assert code == 0 and "ExecutionProvider" not in err
    code, err = run(capsys, "generate", str(tiny32), "x", "--steps", "1", "--verbose", "-o", str(tmp_path / "v.png"))
    lines = [line for line in err.splitlines() if "ExecutionProvider" in line]
    assert code == 0 and lines == [
        "providers: text_encoder CPUExecutionProvider, unet CPUExecutionProvider, vae_decoder CPUExecutionProvider"
    ]


def test_version(capsys):
    from sdruntime import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sdruntime {__version__}"


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model would be loaded."""
    from sdruntime.pipeline import StableDiffusionPipeline

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(StableDiffusionPipeline, "load", load)


@pytest.mark.parametrize(
    ("output", "says"),
    [
        ("missing/dir/x.png", "the folder {tmp}/missing/dir does not exist; create it first"),
        ("afile/x.png", "{tmp}/afile is not a folder"),
        ("x.gif", "end the name with .png, .jpg, .jpeg, .webp"),
        ("x", "end the name with .png"),
        ("adir.png", "is a folder: name an image file in it"),
    ],
)
def test_bad_output_path_fails_before_loading(capsys, tiny32, tmp_path, no_load, output, says):
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.png").mkdir()
    code, err = run(capsys, "generate", str(tiny32), "x", "-o", str(tmp_path / output))
    assert code == 2 and says.format(tmp=tmp_path) in error_line(err)


def test_output_that_cannot_be_created_fails_before_loading(capsys, tiny32, no_load):
    """/proc refuses new files, though os.access lets root write anywhere: only a probe write tells."""
    code, err = run(capsys, "generate", str(tiny32), "x", "-o", "/proc/sdruntime-x.png")
    assert code == 2 and "-o /proc/sdruntime-x.png cannot be written" in error_line(err)


def test_the_output_probe_leaves_nothing_behind(tmp_path):
    from sdruntime.cli import check_output_file, check_output_folder

    check_output_file(str(tmp_path / "new.png"))
    check_output_folder(str(tmp_path / "a" / "b" / "frames"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.png").write_bytes(b"old picture")
    check_output_file(str(tmp_path / "old.png"))
    assert (tmp_path / "old.png").read_bytes() == b"old picture"


def test_unwritable_output_folder_fails_before_loading(capsys, tiny32, tmp_path, no_load, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root, chmod would not stop the write
    code, err = run(capsys, "generate", str(tiny32), "x", "-o", str(tmp_path / "x.png"))
    assert code == 2 and f"the folder {tmp_path} is not writable" in error_line(err)


def test_interpolate_output_that_is_a_file_fails_before_loading(capsys, tiny32, tmp_path, no_load):
    (tmp_path / "frames").write_text("")
    code, err = run(
        capsys, "interpolate", str(tiny32), "--prompt", "a", "--prompt", "b", "-o", str(tmp_path / "frames")
    )
    assert code == 2 and "cannot create the folder" in error_line(err)


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("sdruntime: warning:")]


def test_ignored_settings_warn_once(capsys, tiny32, tmp_path):
    code, err = run(
        capsys,
        "generate",
        str(tiny32),
        "x",
        "--steps",
        "2",
        "--guidance",
        "0.5",
        "--eta",
        "0.3",
        "--scheduler",
        "euler",
        "-n",
        "2",
        "-o",
        str(tmp_path / "w.png"),
    )
    assert code == 0 and warning_lines(err) == [
        "sdruntime: warning: guidance_scale 0.5 <= 1 turns classifier-free guidance off, as in diffusers: the prompt "
        "alone steers and the negative prompt is unused; use a value above 1 to guide",
        "sdruntime: warning: eta 0.3 only applies to ddim: euler ignores it",
    ]
    code, err = run(
        capsys,
        "interpolate",
        str(tiny32),
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--frames",
        "3",
        "--steps",
        "1",
        "--guidance",
        "1",
        "--negative-prompt",
        "blurry",
        "-o",
        str(tmp_path / "frames"),
    )
    assert code == 0 and len(warning_lines(err)) == 1 and "guidance_scale 1 <= 1" in err
    code, err = run(
        capsys,
        "generate",
        str(tiny32),
        "x",
        "--steps",
        "2",
        "--eta",
        "0.3",
        "--scheduler",
        "ddim",
        "--guidance",
        "1",
        "-o",
        str(tmp_path / "d.png"),
    )
    assert (
        code == 0 and warning_lines(err) == []
    )  # eta applies to ddim; guidance 1 without a negative prompt is cfg's own


def test_interpolate_pairwise_and_grid(tiny32, tmp_path):
    assert (
        main(
            [
                "interpolate",
                str(tiny32),
                "--prompt",
                "a",
                "--prompt",
                "b",
                "--frames",
                "3",
                "--steps",
                "2",
                "-o",
                str(tmp_path / "pair"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "pair").glob("frame-*.png"))) == 3
    from PIL import Image

    assert Image.open(tmp_path / "pair" / "sheet.png").size == (3 * 64, 64)
    assert (
        main(
            [
                "interpolate",
                str(tiny32),
                *sum([["--prompt", p] for p in "abcd"], []),
                "--grid",
                "2",
                "--steps",
                "2",
                "-o",
                str(tmp_path / "grid"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "grid" / "sheet.png").size == (128, 128)


def test_interpolate_needs_two_or_four_prompts(capsys, tiny32):
    code, err = run(capsys, "interpolate", str(tiny32), "--prompt", "a")
    assert code == 2 and "needs two --prompt" in error_line(err)


def test_size_other_than_a_static_export(capsys, tmp_path):
    from sdexport import convert

    out = convert(
        "tiny-sd",
        tmp_path / "static",
        static=True,
        height=64,
        width=64,
        components=["text_encoder", "unet", "vae_decoder"],
        check=False,
        log=lambda s: None,
    )
    code, err = run(capsys, "generate", str(out), "x", "--height", "96", "--steps", "1")
    assert code == 2 and "this export is static at 64x64" in error_line(err)


def test_a_bug_inside_the_pipeline_keeps_its_traceback(tiny32, tmp_path, monkeypatch):
    """Only user mistakes (UserError) become one line: a plain ValueError from the code is a bug."""
    from sdruntime.pipeline import StableDiffusionPipeline

    def broken(self, *args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(StableDiffusionPipeline, "denoise", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["generate", str(tiny32), "a cat", "--steps", "1", "-o", str(tmp_path / "a.png")])


def test_an_unreadable_init_image_is_a_bad_argument_not_a_broken_export(tiny32, tmp_path):
    from sdruntime import StableDiffusionPipeline
    from sdruntime.errors import InvalidArgument
    from sdruntime.manifest import ExportError

    (tmp_path / "init.png").write_bytes(b"not a picture")
    pipe = StableDiffusionPipeline.load(tiny32)
    with pytest.raises(InvalidArgument, match="cannot read the init image") as caught:
        pipe("a cat", image=tmp_path / "init.png", num_inference_steps=1)
    assert not isinstance(caught.value, ExportError)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--height", "72"], "height 72 is not a positive multiple of 16"),
        (["--guidance", "nan"], "guidance_scale must be a finite number"),
        (["--scheduler-option", "foo=1"], "has no setting 'foo'"),
    ],
)
def test_a_refused_interpolate_leaves_no_folder(capsys, tiny32, tmp_path, args, says):
    frames = tmp_path / "new" / "frames"
    code, err = run(capsys, "interpolate", str(tiny32), "--prompt", "a", "--prompt", "b", *args, "-o", str(frames))
    assert code == 2 and says in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_sdxl_interpolate_leaves_no_folder(capsys, sdxl32, tmp_path):
    frames = tmp_path / "frames"
    code, err = run(capsys, "interpolate", str(sdxl32), "--prompt", "a", "--prompt", "b", "-o", str(frames))
    assert code == 2 and "SDXL's pooled ones are not handled" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_scheduler_options_reach_the_scheduler_and_the_parameters(tiny32, tmp_path):
    from sdruntime.image import read_parameters

    out = tmp_path / "o.png"
    options = ["--scheduler-option", "clip_sample=false", "--scheduler-option", "timestep_spacing=trailing"]
    code = main(["generate", str(tiny32), "x", "--steps", "2", "--scheduler", "ddim", *options, "-o", str(out)])
    text = read_parameters(out)
    assert code == 0 and "Timestep spacing: trailing" in text
    assert "Scheduler options: clip_sample=false; timestep_spacing=trailing" in text
    code = main(
        ["interpolate", str(tiny32), "--prompt", "a", "--prompt", "b", "--frames", "2", "--steps", "1"]
        + options
        + ["--scheduler", "ddim", "-o", str(tmp_path / "walk")]
    )
    assert code == 0 and "timestep_spacing=trailing" in read_parameters(tmp_path / "walk" / "frame-000.png")


@pytest.mark.parametrize("mask", [[], ["--mask", "mask.png"]], ids=["image-to-image", "inpainting"])
def test_image_inputs_leave_no_file_open(tiny32, tmp_path, mask):
    """A file left for the garbage collector warns `unclosed file` at every run (Python's dev mode shows it)."""
    import os
    import subprocess
    import sys

    write_inpaint_files(tmp_path)
    command = ["generate", str(tiny32), "x", "--steps", "2", "--image", str(tmp_path / "init.png"), *mask]
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-m", "sdruntime.cli", *command, "-o", "i.png"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr and "unclosed" not in done.stderr, done.stderr
    assert (tmp_path / "i.png").is_file()


# -- inpainting ----------------------------------------------------------------------------------------

INPAINT_PROMPT = "a red circle on a blue background, top left"


def write_inpaint_files(folder: Path, width: int = 64, height: int = 64) -> tuple[Path, Path]:
    """init.png (a colour ramp) and mask.png (a white rectangle to repaint, on black to keep) in `folder`."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "init.png")
    inside = (x > width // 3) & (x < 4 * width // 5) & (y > height // 5)
    Image.fromarray((inside * 255).astype(np.uint8)).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def parameter_fields(text: str) -> dict[str, str]:
    """The "Key: value" pairs of a parameters text's last line (none of these values holds a comma)."""
    return dict(item.split(": ", 1) for item in text.splitlines()[-1].split(", "))


def test_inpainting_from_the_cli_is_the_python_api_picture_and_its_parameters_draw_it_again(tiny_inpaint32, tmp_path):
    from PIL import Image
    from sdruntime import StableDiffusionPipeline
    from sdruntime.image import read_parameters

    init, mask = write_inpaint_files(tmp_path)
    out = tmp_path / "cli.png"
    options = ["--image", str(init), "--mask", str(mask), "--strength", "0.75", "--seed", "3", "--steps", "4"]
    assert main(["generate", str(tiny_inpaint32), INPAINT_PROMPT, *options, "-o", str(out)]) == 0
    api = StableDiffusionPipeline.load(tiny_inpaint32)(
        INPAINT_PROMPT, image=init, mask_image=mask, strength=0.75, seed=3, num_inference_steps=4
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    text = read_parameters(out)
    assert text == api.parameters[0]
    fields = parameter_fields(text)
    assert fields["Init image hash"] == sha256_file(init)[:10] and fields["Mask hash"] == sha256_file(mask)[:10]
    assert fields["Denoising strength"] == "0.75"
    width, height = fields["Size"].split("x")
    again = tmp_path / "again.png"
    recorded = [
        *("--steps", fields["Steps"], "--scheduler", fields["Sampler"], "--guidance", fields["CFG scale"]),
        *("--seed", fields["Seed"], "--width", width, "--height", height),
        *("--timestep-spacing", fields["Timestep spacing"], "--strength", fields["Denoising strength"]),
    ]
    code = main(
        ["generate", str(tiny_inpaint32), text.splitlines()[0], "--image", str(init), "--mask", str(mask)]
        + recorded
        + ["-o", str(again)]
    )
    assert code == 0 and again.read_bytes() == out.read_bytes()


def test_an_unreadable_mask_fails_before_loading(capsys, tiny32, tmp_path, no_load):
    init, _ = write_inpaint_files(tmp_path)
    (tmp_path / "mask.png").write_bytes(b"not a picture")
    code, err = run(capsys, "generate", str(tiny32), "x", "--image", str(init), "--mask", str(tmp_path / "mask.png"))
    line = error_line(err)
    assert code == 2 and f"cannot read the mask image {tmp_path / 'mask.png'}: cannot identify image file" in line
    assert line.endswith("pass a PNG or JPEG file")


# -- ControlNet ----------------------------------------------------------------------------------------

# A1111's own pattern for a parameters line's "Key: value" pairs, a value JSON-quoted when it holds a comma
PARAMETER_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def fields_of(line: str) -> dict[str, str]:
    """A parameters line's fields, quoted values unquoted."""
    return {key: json.loads(value) if value.startswith('"') else value for key, value in PARAMETER_FIELD.findall(line)}


def write_control_image(path: Path, width: int = 64, height: int = 64, seed: int = 0) -> Path:
    """A control image: random 8-pixel blocks, as an edge or depth map would be."""
    from PIL import Image

    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))).save(path)
    return path


def recorded_arguments(text: str, control: Path) -> list[str]:
    """The generate options that a parameters text records, `control` standing for each control image."""
    fields = fields_of(text.splitlines()[-1])
    width, height = fields["Size"].split("x")
    arguments = [
        *("--steps", fields["Steps"], "--scheduler", fields["Sampler"], "--guidance", fields["CFG scale"]),
        *("--seed", fields["Seed"], "--width", width, "--height", height),
        *("--timestep-spacing", fields["Timestep spacing"]),
    ]
    if "Denoising strength" in fields:
        arguments += ["--strength", fields["Denoising strength"]]
    units = [fields_of(value) for key, value in fields.items() if key.startswith("ControlNet ")]
    for unit in units:
        assert unit["Image hash"] == sha256_file(control)[:10]
        arguments += ["--control", f"{unit['Model']}={control}:{unit['Weight']}"]
    arguments += ["--control-start", units[0]["Guidance Start"], "--control-end", units[0]["Guidance End"]]
    return arguments + (["--guess-mode"] if fields.get("Guess mode") == "True" else [])


CONTROL_CASES = {
    "text-to-image": (
        ["--control", "edges=CONTROL:0.7", "--control-start", "0.2", "--control-end", "0.9", "--guess-mode"],
        dict(
            controlnet=["edges"],
            controlnet_conditioning_scale=0.7,
            guess_mode=True,
            control_guidance_start=0.2,
            control_guidance_end=0.9,
        ),
    ),
    # the bare form: the export's one ControlNet
    "image-to-image": (
        ["--image", "INIT", "--strength", "0.7", "--control", "CONTROL:1.3"],
        dict(image="INIT", strength=0.7, controlnet_conditioning_scale=1.3),
    ),
    "inpainting": (
        ["--image", "INIT", "--mask", "MASK", "--control", "CONTROL"],
        dict(image="INIT", mask_image="MASK"),
    ),
}


@pytest.mark.parametrize("case", list(CONTROL_CASES))
def test_controlnet_from_the_cli_is_the_python_api_picture_and_its_parameters_draw_it_again(
    tiny_controlnet32, tmp_path, case
):
    from PIL import Image
    from sdruntime import StableDiffusionPipeline
    from sdruntime.image import read_parameters

    init, mask = write_inpaint_files(tmp_path)
    control = write_control_image(tmp_path / "control.png")
    files = {"INIT": init, "MASK": mask, "CONTROL": control}
    options, api_options = CONTROL_CASES[case]
    options = [re.sub("INIT|MASK|CONTROL", lambda m: str(files[m.group()]), option) for option in options]
    out = tmp_path / "cli.png"
    common = ["--seed", "5", "--steps", "4", "--scheduler", "euler-a"]
    assert main(["generate", str(tiny_controlnet32), INPAINT_PROMPT, *common, *options, "-o", str(out)]) == 0
    api_options = {
        key: files.get(value, value) if isinstance(value, str) else value for key, value in api_options.items()
    }
    api = StableDiffusionPipeline.load(tiny_controlnet32)(
        INPAINT_PROMPT, control_image=control, seed=5, num_inference_steps=4, scheduler="euler-a", **api_options
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    text = read_parameters(out)
    assert text == api.parameters[0]
    fields = fields_of(text.splitlines()[-1])
    weight = {"text-to-image": "0.7", "image-to-image": "1.3", "inpainting": "0.5"}[case]  # 0.5: diffusers' default
    assert fields_of(fields["ControlNet 0"])["Weight"] == weight and "ControlNet 1" not in fields
    assert ("Guess mode" in fields) == (case == "text-to-image")
    again = tmp_path / "again.png"
    inputs = ["--image", str(init)] if case != "text-to-image" else []
    inputs += ["--mask", str(mask)] if case == "inpainting" else []
    code = main(
        ["generate", str(tiny_controlnet32), text.splitlines()[0], *inputs, *recorded_arguments(text, control)]
        + ["-o", str(again)]
    )
    assert code == 0 and again.read_bytes() == out.read_bytes()


@pytest.fixture(scope="module")
def two_controlnets(tiny_controlnet32, tmp_path_factory) -> Path:
    """The ControlNet export with a second ControlNet, "depth": a copy of its "edges"."""
    folder = Path(shutil.copytree(tiny_controlnet32, tmp_path_factory.mktemp("two-controlnets") / "export"))
    shutil.copytree(folder / "controlnet" / "edges", folder / "controlnet" / "depth")
    manifest = json.loads((folder / "sdexport.json").read_text())
    edges = json.dumps(manifest["components"]["controlnet/edges"])
    manifest["components"]["controlnet/depth"] = json.loads(edges.replace("controlnet/edges/", "controlnet/depth/"))
    (folder / "sdexport.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("export", "args", "says"),
    [
        ("one", ["--control", "pose=CONTROL"], "unknown ControlNet 'pose': this export has edges"),
        ("one", ["--control", "CONTROL", "--control", "edges=CONTROL"], "with several control images, name each"),
        ("one", ["--control", "CONTROL", "--control-start", "0.8", "--control-end", "0.2"], "0 <= start < end <= 1"),
        ("one", ["--control", "CONTROL", "--control-start", "nan"], "control_guidance_start must be a finite number"),
        ("one", ["--control", "CONTROL:0.5", "--control", "edges=CONTROL"], "name each one's ControlNet: NAME=IMAGE"),
        ("two", ["--control", "CONTROL"], "1 control images for 2 ControlNets (edges, depth): give one image per"),
        ("two", ["--control", "edges=CONTROL", "--control", "depth=NOTANIMAGE"], "cannot read the control image"),
    ],
)
def test_bad_control_arguments(capsys, tiny_controlnet32, two_controlnets, tmp_path, export, args, says):
    control = write_control_image(tmp_path / "control.png")
    (tmp_path / "bad.png").write_text("not an image")
    args = [a.replace("CONTROL", str(control)).replace("NOTANIMAGE", str(tmp_path / "bad.png")) for a in args]
    folder = tiny_controlnet32 if export == "one" else two_controlnets
    code, err = run(capsys, "generate", str(folder), "x", "--steps", "2", *args, "-o", str(tmp_path / "o.png"))
    assert code == 2 and says in error_line(err)
    assert not (tmp_path / "o.png").exists()


def test_two_controlnets_by_name_draw(two_controlnets, tmp_path):
    control = write_control_image(tmp_path / "control.png")
    controls = ["--control", f"edges={control}:0.5", "--control", f"depth={control}"]
    out = tmp_path / "two.png"
    assert main(["generate", str(two_controlnets), "x", "--steps", "2", *controls, "-o", str(out)]) == 0
    from sdruntime.image import read_parameters

    fields = fields_of(read_parameters(out).splitlines()[-1])
    assert [fields_of(fields[f"ControlNet {i}"])["Model"] for i in (0, 1)] == ["edges", "depth"]
    assert [fields_of(fields[f"ControlNet {i}"])["Weight"] for i in (0, 1)] == ["0.5", "1"]


def test_a_missing_control_image_fails_before_loading(capsys, tiny_controlnet32, tmp_path, no_load):
    missing = tmp_path / "edges.png"
    code, err = run(capsys, "generate", str(tiny_controlnet32), "x", "--control", f"edges={missing}")
    line = error_line(err)
    assert code == 2 and f"cannot read the control image {missing}: [Errno 2] No such file" in line


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("edges=c.png", ("edges", "c.png", None)),
        ("edges=c.png:0.75", ("edges", "c.png", 0.75)),
        ("c.png:2", (None, "c.png", 2.0)),
        ("c.png", (None, "c.png", None)),
        ("edges=a:b.png", ("edges", "a:b.png", None)),  # a ':' in the path, not followed by a number
        ("a:b.png:1e-1", (None, "a:b.png", 0.1)),
        ("c.png:nan", (None, "c.png:nan", None)),  # not a finite number: part of the path
        ("dir/x=y.png", (None, "dir/x=y.png", None)),  # a '/' before '=': all of it is the path
        ("depth=dir/x=y.png:0", ("depth", "dir/x=y.png", 0.0)),
    ],
)
def test_control_option_parsing(text, parsed):
    from sdruntime.cli import parse_control

    assert parse_control(text) == parsed


# -- SD3 and Flux ------------------------------------------------------------------------------------------

TRANSFORMER_CASES = {
    "sd3": (
        "sd3_32",
        {
            "prompt_2": "a green field",
            "prompt_3": "under a grey sky",
            "negative_prompt": "blurry",
            "negative_prompt_3": "dark",
            "max_sequence_length": 32,
            "guidance_scale": 4.0,
        },
    ),
    "flux": (
        "flux32",
        {
            "prompt_2": "a green field",
            "negative_prompt": "blurry",
            "negative_prompt_2": "dark",
            "true_cfg_scale": 2.0,
            "max_sequence_length": 32,
            "sigmas": [1.0, 0.6],
            "guidance_scale": 5.0,
        },
    ),
}


def cli_arguments(fields: dict) -> list[str]:
    """A request's fields as `generate` options: --true-cfg, a --sigma per sigma, --guidance, --prompt-2, ..."""
    names = {"true_cfg_scale": "--true-cfg", "guidance_scale": "--guidance"}
    args = []
    for key, value in fields.items():
        for one in value if isinstance(value, list) else [value]:
            args += [names.get(key, "--" + key.replace("_", "-").replace("sigmas", "sigma")), str(one)]
    return args


@pytest.mark.parametrize("family", list(TRANSFORMER_CASES))
def test_transformer_options_draw_the_python_api_picture(request, tmp_path, family):
    """Every SD3/Flux option reaches the pipeline: the CLI's PNG is the Python API's picture and parameters for the
    same arguments, and not the picture drawn without them."""
    from PIL import Image
    from sdruntime import StableDiffusionPipeline
    from sdruntime.image import read_parameters

    export, fields = TRANSFORMER_CASES[family]
    folder = request.getfixturevalue(export)
    out = tmp_path / "cli.png"
    size = ["--height", "32", "--width", "32", "--seed", "5"]
    steps = [] if "sigmas" in fields else ["--steps", "2"]
    assert main(["generate", str(folder), "a red circle", *cli_arguments(fields), *size, *steps, "-o", str(out)]) == 0
    pipe = StableDiffusionPipeline.load(folder)
    common = {"height": 32, "width": 32, "seed": 5, "num_inference_steps": 2 if steps else None}
    api = pipe("a red circle", **fields, **common)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    assert read_parameters(out) == api.parameters[0] and "Prompt 2: a green field" in api.parameters[0]
    plain = pipe("a red circle", **{**common, "num_inference_steps": 2})
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(api.images[0]))


def diffusers_defaults(pipeline: str) -> tuple[str, str]:
    """(steps, guidance scale) as diffusers' `pipeline.__call__` defaults them, written as the parameters text does."""
    import inspect

    diffusers = pytest.importorskip("diffusers")
    parameters = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
    return str(parameters["num_inference_steps"].default), f"{parameters['guidance_scale'].default:g}"


@pytest.mark.parametrize(
    ("export", "pipeline", "init", "guidance_field"),
    [
        ("tiny32", "StableDiffusionPipeline", False, "CFG scale"),
        ("sdxl32", "StableDiffusionXLPipeline", False, "CFG scale"),
        ("sd3_32", "StableDiffusion3Pipeline", False, "CFG scale"),
        ("flux32", "FluxPipeline", False, "Distilled CFG Scale"),  # dev embeds it; true CFG is off (1)
        ("flux32", "FluxImg2ImgPipeline", True, "Distilled CFG Scale"),
    ],
)
def test_steps_and_guidance_default_to_the_family(request, tmp_path, export, pipeline, init, guidance_field):
    """Without --steps and --guidance a run takes its family's defaults: diffusers' guidance scale for the
    pipeline of the mode, and its steps for SD3 and Flux (28); SD and SDXL keep the runtime's 25 (diffusers': 50)."""
    from PIL import Image
    from sdruntime.image import read_parameters

    folder = request.getfixturevalue(export)
    images = []
    if init:
        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
        images = ["--image", str(tmp_path / "init.png")]
    out = tmp_path / "out.png"
    assert main(["generate", str(folder), "a red circle", "--seed", "1", *images, "-o", str(out)]) == 0
    fields = parameter_fields(read_parameters(out))
    steps, guidance = diffusers_defaults(pipeline)
    assert fields["Steps"] == (steps if export in ("sd3_32", "flux32") else "25")
    assert fields[guidance_field] == guidance
    if export == "flux32":
        assert fields["CFG scale"] == "1"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--prompt-2", "a cat"], "prompt_2"),
        (["--negative-prompt-3", "a dog"], "negative_prompt_3"),
        (["--max-sequence-length", "77"], "max_sequence_length"),
        (["--true-cfg", "2"], "true_cfg_scale"),
        (["--sigma", "1", "--sigma", "0.5"], "sigmas"),
    ],
)
def test_transformer_options_are_refused_on_a_unet_export(capsys, tiny32, tmp_path, args, field):
    code, err = run(capsys, "generate", str(tiny32), "x", "--steps", "2", *args, "-o", str(tmp_path / "o.png"))
    assert code == 2 and not (tmp_path / "o.png").exists()
    assert error_line(err) == (
        f"sdruntime: error: {field} applies to SD3 and Flux exports; this sd1 export does not take it: leave it out"
    )


@pytest.mark.parametrize(
    "field",
    [
        "prompt_2",
        "prompt_3",
        "negative_prompt_2",
        "negative_prompt_3",
        "max_sequence_length",
        "sigmas",
        "true_cfg_scale",
    ],
)
def test_every_transformer_field_is_refused_by_the_unet_plan(sdxl32, field):
    from sdruntime import StableDiffusionPipeline
    from sdruntime.request import GenerationError, GenerationRequest

    value = {"max_sequence_length": 77, "sigmas": [1.0, 0.5], "true_cfg_scale": 2.0}.get(field, "a cat")
    request = GenerationRequest("x", num_inference_steps=1, **{field: value})
    with pytest.raises(GenerationError, match=f"^{field} applies to SD3 and Flux exports; this sdxl export does not"):
        StableDiffusionPipeline.load(sdxl32).generate(request)


def test_steps_that_disagree_with_the_sigmas_are_refused_before_loading(capsys, sd3_32, tmp_path, no_load):
    args = ["--steps", "3", "--sigma", "1", "--sigma", "0.5", "-o", str(tmp_path / "o.png")]
    code, err = run(capsys, "generate", str(sd3_32), "x", *args)
    assert code == 2 and "--steps 3 with 2 --sigma: the sigmas set the steps, leave --steps out" in error_line(err)


@pytest.mark.parametrize(("export", "family"), [("sd3_32", "sd3"), ("flux32", "flux")])
def test_interpolate_on_a_transformer_export_is_refused_before_loading(
    capsys, request, tmp_path, no_load, export, family
):
    folder = request.getfixturevalue(export)
    frames = tmp_path / "frames"
    code, err = run(capsys, "interpolate", str(folder), "--prompt", "a", "--prompt", "b", "-o", str(frames))
    assert code == 2 and error_line(err) == (
        f"sdruntime: error: interpolate walks SD 1.x/2.x text embeddings; this {family} export's (CLIP and T5 states) "
        "are not handled: draw single images with `sdruntime generate`"
    )
    assert list(tmp_path.iterdir()) == []
