"""quickstart.py: the set-up runs README's set-up once and again only when what decides the venv changed; the
demo reuses a complete export and converts an incomplete one again. Commands are recorded, not run: building
a venv takes minutes (`python3.11 quickstart.py demo` in a fresh clone is timed in README instead)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import quickstart

REPO = Path(__file__).resolve().parents[1]
# what decides the venv's packages (README's Quick start says so): a change to any of them installs again
DECIDING = ("pyproject.toml", "runtime/pyproject.toml", ".ci/constraints.txt")


class Recorder:
    """Stands in for subprocess.run: records each command; `python -m venv` makes the venv's interpreter file;
    a command with an argument equal to a key of `exit_codes` exits with its code, else 0."""

    def __init__(self, exit_codes: dict[str, int] | None = None):
        self.commands: list[list[str]] = []
        self.exit_codes = exit_codes or {}

    def __call__(self, args, **kwargs) -> subprocess.CompletedProcess:
        args = [str(a) for a in args]
        self.commands.append(args)
        if args[1:3] == ["-m", "venv"]:
            python = quickstart.venv_python(Path(args[3]))
            python.parent.mkdir(parents=True)
            python.write_text("")
        return subprocess.CompletedProcess(args, next((c for a, c in self.exit_codes.items() if a in args), 0))


@pytest.fixture
def repo(tmp_path) -> Path:
    """A folder with the files that decide the venv, copied from the project."""
    for name in DECIDING:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [c[c.index("install") + 1 :] for c in commands if c[1:4] == ["-m", "pip", "install"]]


def test_first_setup_makes_the_venv_and_installs_torch_first_constrained(repo):
    run = Recorder()
    assert quickstart.setup(repo, run)
    assert run.commands[0] == [sys.executable, "-m", "venv", str(repo / ".venv")]
    installs = pip_installs(run.commands)
    assert installs == [
        ["-c", ".ci/constraints.txt", "torch==2.13.0"],
        ["-c", ".ci/constraints.txt", *quickstart.PACKAGES],
    ]
    assert quickstart.install_reason(repo, repo / ".venv") is None


def test_second_setup_runs_nothing_and_is_quick(repo):
    quickstart.setup(repo, Recorder())
    run = Recorder()
    started = time.perf_counter()
    assert not quickstart.setup(repo, run)
    assert run.commands == [] and time.perf_counter() - started < 0.5


@pytest.mark.parametrize("changed", DECIDING)
def test_a_changed_file_installs_again_in_the_same_venv(repo, changed):
    quickstart.setup(repo, Recorder())
    (repo / changed).write_text((repo / changed).read_text() + "\n# changed\n")
    assert "changed since" in quickstart.install_reason(repo, repo / ".venv")
    run = Recorder()
    assert quickstart.setup(repo, run)
    assert [c[1:3] for c in run.commands if c[1:3] == ["-m", "venv"]] == []  # the venv stays, packages go again
    assert len(pip_installs(run.commands)) == 2
    assert quickstart.install_reason(repo, repo / ".venv") is None


def test_a_cut_short_install_is_done_again(repo):
    with pytest.raises(SystemExit, match="installing sdexport and sdexport-runtime failed"):
        quickstart.setup(repo, Recorder({"runtime[test]": 1}))
    assert quickstart.install_reason(repo, repo / ".venv") == ".venv was not set up by quickstart.py"
    assert quickstart.setup(repo, Recorder())


def test_test_command_is_readmes_with_extra_arguments(repo):
    run = Recorder({"pytest": 3})
    assert quickstart.run_tests(repo, ["-k", "name"], run) == 3  # pytest's exit code comes back
    assert run.commands[-1] == [str(quickstart.venv_python(repo / ".venv")), *quickstart.TEST_ARGS, "-k", "name"]
    assert quickstart.run_tests(repo, (), Recorder({"pytest": -15})) == 128 + 15  # stopped by SIGTERM


def test_the_test_command_installs_a_missing_browser_with_apt(monkeypatch, tmp_path):
    missing = str(tmp_path / "chromium")
    monkeypatch.setattr(quickstart.os, "geteuid", lambda: 0)
    monkeypatch.setattr(quickstart.shutil, "which", lambda name: f"/usr/bin/{name}")
    run = Recorder()
    quickstart.install_browser(run, missing)
    assert run.commands == [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]]
    run = Recorder()
    quickstart.install_browser(run, sys.executable)  # present: nothing to do
    assert run.commands == []
    monkeypatch.setattr(quickstart.os, "geteuid", lambda: 1000)
    run = Recorder()
    quickstart.install_browser(run, missing)
    assert all(c[0] == "sudo" for c in run.commands) and len(run.commands) == 2
    monkeypatch.setattr(quickstart.shutil, "which", lambda name: None if name == "sudo" else f"/usr/bin/{name}")
    with pytest.raises(SystemExit, match="needs Debian's chromium at .*: install it"):
        quickstart.install_browser(Recorder(), missing)
    with pytest.raises(SystemExit, match="apt-get install -y -qq chromium. failed"):
        monkeypatch.setattr(quickstart.os, "geteuid", lambda: 0)
        quickstart.install_browser(Recorder({"chromium": 100}), missing)


@pytest.mark.parametrize("complete", [True, False])
def test_demo_converts_only_without_a_complete_export(repo, complete):
    quickstart.setup(repo, Recorder())
    run = Recorder({quickstart.EXPORT_COMPLETE: 0 if complete else 1})
    assert quickstart.demo(repo, run) == repo / "circle.png"
    converts = [c for c in run.commands if c[1:2] == ["convert"]]
    assert len(converts) == (0 if complete else 1)
    if not complete:
        assert converts[0][1:] == ["convert", "shapes", "-o", "out/shapes", "--overwrite"]
    assert run.commands[-1][1:] == [
        "generate",
        "out/shapes",
        quickstart.DEMO_PROMPT,
        "--seed",
        "0",
        "-o",
        "circle.png",
    ]


def export_complete(folder: Path, source: str = "shapes") -> bool:
    check = [sys.executable, "-c", quickstart.EXPORT_COMPLETE, str(folder), source]
    return subprocess.run(check, capture_output=True).returncode == 0


def test_completeness_check_on_a_real_export(shapes32, tmp_path):
    assert export_complete(shapes32) and not export_complete(shapes32, "tiny-sd")
    assert not export_complete(tmp_path / "missing")
    cut = Path(shutil.copytree(shapes32, tmp_path / "cut"))
    with open(cut / "unet" / "model.onnx", "r+b") as f:
        f.truncate(1000)  # as a copy cut short leaves it
    assert not export_complete(cut)
    lacking = Path(shutil.copytree(shapes32, tmp_path / "lacking"))
    manifest = json.loads((lacking / "sdexport.json").read_text())
    (lacking / manifest["components"]["vae_decoder"]["path"]).unlink()
    assert not export_complete(lacking)


def test_the_projects_venv_is_not_set_up_again():
    """Where this suite runs in a venv set up by quickstart.py (CI's, a newcomer's), setting up again does
    nothing and returns at once."""
    venv = REPO / quickstart.VENV_NAME
    if quickstart.install_reason(REPO, venv) is not None:
        pytest.skip(f"{venv} was not set up by quickstart.py, or has changed since")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "quickstart.py"), "setup"], capture_output=True, text=True)
    assert done.returncode == 0 and "setting up" not in done.stderr, done.stderr
    assert time.perf_counter() - started < 10
