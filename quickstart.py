#!/usr/bin/env python3.11
"""Two commands from a fresh clone, with nothing but python3.11 installed (README's Quick start):

    python3.11 quickstart.py demo    set up .venv, convert the shipped `shapes` model, draw circle.png
    python3.11 quickstart.py test    set up .venv, run the default test suite

Only the standard library: it runs before anything is installed. The set-up is idempotent: .venv is
created when missing, and its packages are installed (torch==2.13.0 first, every pip call constrained
by .ci/constraints.txt) only when pyproject.toml, runtime/pyproject.toml or .ci/constraints.txt changed
since the last install, which a stamp in .venv records by their hash. The demo's conversion is reused
while it is complete. Extra arguments after `test` go to pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV_NAME = ".venv"
STAMP_NAME = ".quickstart-stamp"  # inside the venv, so that deleting the venv deletes it
STAMPED_FILES = ("pyproject.toml", "runtime/pyproject.toml", ".ci/constraints.txt")
CONSTRAINTS = ".ci/constraints.txt"
TORCH = "torch==2.13.0"  # installed first, alone: the constraints pin it, README's Set up does the same
PACKAGES = ("-e", "runtime[test]", "-e", ".[test]")
DEMO_SOURCE = "shapes"
DEMO_EXPORT = "out/shapes"
DEMO_PROMPT = "a red circle on a blue background, center"
DEMO_IMAGE = "circle.png"
TEST_ARGS = ("-m", "pytest", "-q", "-m", "not slow")  # README's Tests line, as `python TEST_ARGS`
BROWSER = "/usr/bin/chromium"  # Debian's chromium: the page's browser test drives it (tests/runtime/test_web_page.py)
BROWSER_INSTALL = (("apt-get", "update", "-qq"), ("apt-get", "install", "-y", "-qq", "chromium"))

Runner = Callable[..., subprocess.CompletedProcess]

# Run in the venv: exit 0 when the folder is a complete export of `shapes` (every file its manifest lists is
# there, at its recorded size); the exporter writes a staged folder and renames it, so a cut-short convert
# leaves no manifest.
EXPORT_COMPLETE = """
import sys
from sdruntime.manifest import read_manifest
try:
    m = read_manifest(sys.argv[1])
except Exception:
    sys.exit(1)
files = [f for c in m.components.values() for f in c.files] + list(m.config_files)
ok = m.source.name == sys.argv[2] and all(
    (m.folder / f.path).is_file() and (m.folder / f.path).stat().st_size == f.bytes for f in files
)
sys.exit(0 if ok else 1)
"""


def venv_python(venv: Path) -> Path:
    """The venv's interpreter."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_script(venv: Path, name: str) -> Path:
    """A console script the venv's packages installed (sdexport, sdruntime)."""
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def inputs_hash(repo: Path) -> str:
    """The hash the stamp records: the files that decide what the venv holds, and this Python's version."""
    digest = hashlib.sha256(f"python {sys.version_info[0]}.{sys.version_info[1]}\n".encode())
    for name in STAMPED_FILES:
        path = repo / name
        digest.update(f"{name}\n".encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()


def install_reason(repo: Path, venv: Path) -> str | None:
    """Why the venv's packages must be installed now, or None when the last install still holds."""
    if not venv_python(venv).is_file():
        return f"{venv.name} is missing"
    stamp = venv / STAMP_NAME
    if not stamp.is_file():
        return f"{venv.name} was not set up by quickstart.py"
    if stamp.read_text(encoding="utf-8").strip() != inputs_hash(repo):
        return f"{', '.join(STAMPED_FILES)} or the Python version changed since {venv.name} was set up"
    return None


def quickstart_env(venv: Path) -> dict[str, str]:
    """The environment of every command: the venv first on PATH (as `activate` does), the model hub off."""
    bin_dir = venv_python(venv).parent
    return {
        **os.environ,
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def setup(repo: Path = REPO, run: Runner = subprocess.run) -> bool:
    """Create .venv when missing and install the packages when the stamp says so; True when it installed."""
    venv = repo / VENV_NAME
    reason = install_reason(repo, venv)
    if reason is None:
        return False
    started = time.perf_counter()
    say(f"setting up {venv.name}: {reason}")
    python = venv_python(venv)
    if python.is_file() and run([str(python), "-c", ""], cwd=repo).returncode != 0:
        shutil.rmtree(venv)  # its interpreter no longer runs (its base Python was removed): built again
    if not python.is_file():
        check(run([sys.executable, "-m", "venv", str(venv)], cwd=repo), "creating the virtual environment")
    (venv / STAMP_NAME).unlink(missing_ok=True)  # a cut-short install must not look complete
    env = quickstart_env(venv)
    pip = [str(python), "-m", "pip", "install", "-c", CONSTRAINTS]
    check(run([*pip, TORCH], cwd=repo, env=env), f"installing {TORCH}")
    check(run([*pip, *PACKAGES], cwd=repo, env=env), "installing sdexport and sdexport-runtime")
    (venv / STAMP_NAME).write_text(inputs_hash(repo) + "\n", encoding="utf-8")
    say(f"{venv.name} is set up ({time.perf_counter() - started:.0f} s)")
    return True


def demo(repo: Path = REPO, run: Runner = subprocess.run) -> Path:
    """Set up, convert `shapes` unless a complete export is there, draw circle.png; its path."""
    setup(repo, run)
    venv = repo / VENV_NAME
    env = quickstart_env(venv)
    complete = [str(venv_python(venv)), "-c", EXPORT_COMPLETE, DEMO_EXPORT, DEMO_SOURCE]
    if run(complete, cwd=repo, env=env).returncode == 0:
        say(f"reusing {DEMO_EXPORT}")
    else:
        convert = [str(venv_script(venv, "sdexport")), "convert", DEMO_SOURCE, "-o", DEMO_EXPORT, "--overwrite"]
        check(run(convert, cwd=repo, env=env, stdout=subprocess.DEVNULL), f"converting {DEMO_SOURCE}")
    generate = [str(venv_script(venv, "sdruntime")), "generate", DEMO_EXPORT, DEMO_PROMPT, "--seed", "0"]
    check(run([*generate, "-o", DEMO_IMAGE], cwd=repo, env=env, stdout=subprocess.DEVNULL), "drawing")
    return repo / DEMO_IMAGE


def install_browser(run: Runner = subprocess.run, browser: str = BROWSER) -> None:
    """Install Debian's chromium for the browser test when it is missing (as root, or through sudo)."""
    if Path(browser).is_file():
        return
    as_root = [] if os.name != "posix" or os.geteuid() == 0 else ["sudo"]
    if shutil.which("apt-get") is None or (as_root and shutil.which("sudo") is None):
        raise SystemExit(
            f"quickstart: the page's browser test needs Debian's chromium at {browser}: install it "
            "(`apt-get install chromium`) and run this again"
        )
    say("installing Debian's chromium for the page's browser test")
    for step in BROWSER_INSTALL:
        check(run([*as_root, *step], stdout=subprocess.DEVNULL), f"`{' '.join(step)}`")


def run_tests(repo: Path = REPO, pytest_args: Sequence[str] = (), run: Runner = subprocess.run) -> int:
    """Set up (chromium included), then README's test command in the venv; pytest's exit code (128 + N when
    signal N stopped it)."""
    setup(repo, run)
    install_browser(run)
    venv = repo / VENV_NAME
    code = run([str(venv_python(venv)), *TEST_ARGS, *pytest_args], cwd=repo, env=quickstart_env(venv)).returncode
    return code if code >= 0 else 128 - code  # as a shell reports it, not sys.exit(-15)'s 241


def check(result: subprocess.CompletedProcess, what: str) -> None:
    """Stop with one line when a step failed (its own output says why)."""
    if result.returncode != 0:
        raise SystemExit(f"quickstart: {what} failed (exit code {result.returncode}); its output is above")


def say(line: str) -> None:
    print(f"quickstart: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`demo`, `test [PYTEST ARGS]` or `setup`."""
    parser = argparse.ArgumentParser(prog="quickstart.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("demo", "test", "setup"))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "test":
        parser.error(f"unexpected arguments {' '.join(rest)}: only `test` passes arguments on (to pytest)")
    if args.command == "setup":
        setup()
        return 0
    if args.command == "test":
        return run_tests(pytest_args=rest)
    print(demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
