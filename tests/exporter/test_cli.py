"""The `sdexport` CLI: bad input gets one line, exit code 2 and nothing written; inspect and presets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sdexport.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, out: Path, *args: str, says: str) -> None:
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    code, _, err = run(capsys, "convert", *args, "-o", str(out))
    errors = [line for line in err.splitlines() if line.startswith("sdexport:")]
    assert code == 2
    assert len(errors) == 1 and "Traceback" not in err, err  # progress lines may precede it
    assert errors[0].startswith("sdexport: error: ") and says in errors[0], errors[0]
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, "something was written"


def write_fake_pipeline(folder: Path, class_name: str, unet: dict, extra_index: dict | None = None) -> Path:
    """A folder with model_index.json and configs only: refusals must happen before any weights load."""
    folder.mkdir(parents=True)
    index = {"_class_name": class_name, "unet": ["diffusers", "UNet2DConditionModel"], **(extra_index or {})}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, **unet}))
    return folder


def test_missing_source(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "out", "no-such-model", says="'no-such-model' not found")


def test_folder_that_is_not_a_pipeline(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    assert_refused(capsys, tmp_path / "out", str(tmp_path / "src"), says="not a diffusers pipeline")


def test_folder_missing_a_component(capsys, tmp_path, sd2_case):
    folder = tmp_path / "partial"
    import shutil

    shutil.copytree(sd2_case[0], folder)
    shutil.rmtree(folder / "vae")
    assert_refused(capsys, tmp_path / "out", str(folder), says="missing its vae")


@pytest.mark.parametrize(
    ("class_name", "unet", "extra", "says"),
    [
        (
            "StableDiffusionUpscalePipeline",
            {"class_embed_type": "timestep"},
            None,
            "(an upscaler or unCLIP): not supported",
        ),
        (
            "StableDiffusionControlNetPipeline",
            {},
            {"controlnet": ["diffusers", "ControlNetModel"]},
            "ControlNet is not supported yet",
        ),
    ],
)
def test_unsupported_families(capsys, tmp_path, class_name, unet, extra, says):
    folder = write_fake_pipeline(tmp_path / "src", class_name, unet, extra)
    assert_refused(capsys, tmp_path / "out", str(folder), says=says)


def test_existing_output_without_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, out, "tiny-sd", says="already exists: pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_output(capsys, tmp_path):
    if os.geteuid() == 0:
        out = Path("/proc/sdexport-out")  # root may write anywhere else
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    code, _, err = run(capsys, "convert", "tiny-sd", "-o", str(out))
    assert code == 2 and "sdexport: error:" in err and str(out.parent) in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--components", "unet,refiner"], "unknown component 'refiner'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--keep-fp32", "vae"], "unknown component 'vae' in --keep-fp32"),
        (["--target", "metal"], "unknown target 'metal'"),
        (["--height", "64"], "add --static"),
        (["--keep-fp32", "unet"], "--keep-fp32 keeps components of an fp16 export in fp32, and this export is fp32"),
    ],
)
def test_bad_options(capsys, tmp_path, args, says):
    assert_refused(capsys, tmp_path / "out", "tiny-sd", *args, says=says)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["tiny-sd", "-o", "out", "--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["tiny-sd", "-o", "out", "--target", "gpu"], "unknown target 'gpu'"),
        (["tiny-sd", "-o", "out", "--components", "unet,vea"], "unknown component 'vea'"),
        (["tiny-sd", "-o", "out", "--keep-fp32", "unet"], "--keep-fp32 keeps components of an fp16 export"),
        (["./no-such-model", "-o", "out"], "'./no-such-model' not found"),
        (["tiny-sd", "-o", "exists"], "exists already exists: pass --overwrite"),
    ],
)
def test_argument_errors_are_refused_before_torch_is_imported(tmp_path, args, says):
    """torch takes seconds to import: a wrong argument is named without it (a fresh interpreter each time)."""
    import subprocess
    import sys

    (tmp_path / "exists").mkdir()
    probe = (
        "import sys\n"
        "from sdexport.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "convert", *args],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and lines[-1] == "torch imported: False", done.stderr
    assert len(lines) == 2 and lines[0].startswith("sdexport: error: ") and says in lines[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"] and not any((tmp_path / "exists").iterdir())


def test_unknown_preset_lists_presets(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "out", "tiny-xl", says="tiny-sd")


def test_static_size_not_a_multiple(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "out", "tiny-sd", "--static", "--height", "72", says="not a multiple of 16")


def test_unknown_option_is_one_line(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "out", "tiny-sd", "--bogus", says="--bogus")


def test_presets_lists_tiny_sd(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and out.startswith("tiny-sd") or "\ntiny-sd" in out


def test_inspect_table_and_json(capsys, tiny16):
    code, out, _ = run(capsys, "inspect", str(tiny16))
    assert code == 0
    assert "unet" in out and "timestep float32[batch]" in out and "nodes kept in fp32" in out
    code, out, _ = run(capsys, "inspect", str(tiny16), "--json")
    report = json.loads(out)
    unet = report["components"]["unet"]
    assert report["dtype"] == "fp16" and unet["op_counts"]["Conv"] > 0 and unet["contrib_ops"] == []
    assert report["pipeline"]["vae_scale_factor"] == 8


def test_inspect_not_an_export(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "is not an sdexport export" in err


def test_overwrite_replaces(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, _ = run(
        capsys, "convert", "tiny-sd", "--components", "vae_decoder", "--overwrite", "--no-check", "-o", str(out)
    )
    assert code == 0
    assert not (out / "old.txt").exists() and (out / "vae_decoder" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_default_source_is_the_shapes_preset_and_parents_are_created(capsys, tmp_path):
    out = tmp_path / "new" / "folders" / "shapes"
    code, _, err = run(capsys, "convert", "--components", "vae_decoder", "--no-check", "-o", str(out))
    assert code == 0, err
    manifest = json.loads((out / "sdexport.json").read_text())
    assert manifest["source"] == {"kind": "preset", "name": "shapes", "loras": [], "vae": "pipeline"}


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_convert_removes_what_a_killed_convert_left(capsys, tmp_path):
    out, dead = tmp_path / "out", dead_pid()
    left = {
        name: tmp_path / name
        for name in (
            f".out.tmp-{dead}",
            f".out.old-{dead}",  # a killed convert's: removed
            f".out.tmp-{os.getppid()}",  # a running process's: kept
            f".out.tmp-{dead + 1000000}",  # a failed validation's, kept with its report
            f".other.tmp-{dead}",  # another output's
        )
    }
    for path in left.values():
        path.mkdir()
        (path / "sdexport.json").write_text("{}")
    (left[f".out.tmp-{dead + 1000000}"] / "validation.json").write_text("{}")
    (left[f".out.tmp-{dead}"] / ".convert.lock").write_text("")  # its lock went with its process
    out.mkdir()  # an earlier export: the interrupted replace's old folder is not the only copy
    code, out_text, err = run(
        capsys, "convert", "tiny-sd", "--components", "vae_decoder", "--no-check", "--overwrite", "-o", str(out)
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f".out.tmp-{os.getppid()}", f".out.tmp-{dead + 1000000}", f".other.tmp-{dead}"]
    )
    assert f"removed {left[f'.out.tmp-{dead}']}, left by an interrupted convert" in out_text + err


def test_an_interrupted_replace_keeps_the_previous_export(capsys, tmp_path):
    """Killed between moving OUT aside and moving the new one in: the old export is all there is."""
    old = tmp_path / f".out.old-{dead_pid()}"
    old.mkdir()
    args = ["convert", "tiny-sd", "--components", "vae_decoder", "--no-check", "-o", str(tmp_path / "out")]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert old.is_dir()  # OUT was missing: the leftover stays
    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert not old.exists()  # OUT was there: the leftover goes


def test_a_locked_temporary_folder_stays(capsys, tmp_path):
    """A convert on another host or container holds its folder's lock while its process id means nothing here."""
    import subprocess
    import sys

    busy = tmp_path / f".out.tmp-{dead_pid()}"
    busy.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, sys, time\n"
                f"handle = open({str(busy / '.convert.lock')!r}, 'w')\n"
                "fcntl.flock(handle, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(
            capsys, "convert", "tiny-sd", "--components", "vae_decoder", "--no-check", "-o", str(tmp_path / "out")
        )
        assert code == 0, err
        assert busy.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "out" / ".convert.lock").exists()  # the export never holds the lock file


def test_importing_diffusers_through_sdexport_prints_nothing(tmp_path):
    """diffusers' notice about two distributions of `optimum` (optimum-onnx installed) stays quiet through
    sdexport's entry points, the Python API and the command line; the quieting is scoped to the call: no
    warning filter is left behind."""
    import subprocess
    import sys

    script = f"""
import warnings
filters = list(warnings.filters)
from sdexport import convert
try:
    convert({str(tmp_path / "missing")!r}, {str(tmp_path / "out")!r})
except Exception as e:
    print(type(e).__name__)
assert warnings.filters == filters, "a warning filter outlived sdexport's call"
"""
    api = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert api.returncode == 0 and api.stdout.strip() == "SdexportError", (api.stdout, api.stderr)
    assert "Multiple distributions" not in api.stderr, api.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "sdexport.cli", "convert", str(tmp_path / "missing"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and len(cli.stderr.splitlines()) == 1, cli.stderr


def test_inspect_of_a_corrupted_graph_is_one_line(tiny32, tmp_path, capsys):
    out = Path(shutil.copytree(tiny32, tmp_path / "export"))
    path = out / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    code = main(["inspect", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (
        err.strip() == f"sdexport: error: {path} is not a readable ONNX model (Error parsing message with type "
        "'onnx.ModelProto': Wire format was corrupt): run `sdexport convert` again"
    )
