"""README's set-up lines install what README's test command needs, and CI runs exactly those lines."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first bash block under `## heading`, as .ci/run reads it."""
    script = (
        "awk -v h=\"## $1\" '$0 == h {f=1; next} f && /^```bash/ {g=1; next} g && /^```/ {exit} g {print}' README.md"
    )
    return subprocess.run(
        ["bash", "-c", script, "-", heading], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def extras(pyproject: Path, name: str) -> list[str]:
    return tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"][name]


def test_setup_installs_the_test_extras():
    setup = readme_block("Set up")
    assert re.search(r'-e "runtime\[test\]"', setup) and re.search(r'-e "\.\[test\]"', setup), setup
    needed = {re.split(r"[<>=\[ ]", r)[0] for r in extras(REPO / "pyproject.toml", "test")}
    # what the tests import beyond the project's own dependencies
    assert {"pytest", "scipy", "jsonschema", "ftfy", "optimum-onnx"} <= needed
    assert "pytest" in {re.split(r"[<>=\[ ]", r)[0] for r in extras(REPO / "runtime" / "pyproject.toml", "test")}


def test_quick_start_is_two_lines_that_ci_runs():
    assert readme_block("Quick start").splitlines() == [
        "python3.11 quickstart.py demo",
        "python3.11 quickstart.py test",
    ]
    readme = (REPO / "README.md").read_text()
    assert readme.index("## Quick start") < readme.index("## Set up")  # the first section a newcomer meets
    ci = (REPO / ".ci" / "run").read_text()
    assert 'quick_test=$(readme_block "Quick start" | sed -n 2p)' in ci and 'eval "$quick_test"' in ci
    before = ci.split('eval "$quick_test"')[0]
    assert "pytest" not in before and "pip install" not in before  # no set-up or test run of its own first
    assert "rm -rf .venv" in before  # and the quick start's set-up starts from nothing


def test_quickstart_runs_the_readme_lines():
    """quickstart.py's set-up is README's Set up block, and its test command README's Tests line."""
    import quickstart

    assert readme_block("Tests").strip() == 'python -m pytest -q -m "not slow"'
    assert shlex.split(readme_block("Tests")) == ["python", *quickstart.TEST_ARGS]
    commands = [shlex.split(c) for line in readme_block("Set up").splitlines() for c in line.split("&&")]
    assert commands[0] == ["python3.11", "-m", "venv", quickstart.VENV_NAME]
    torch = commands.index(["pip", "install", quickstart.TORCH])
    assert commands.index(["pip", "install", "-c", quickstart.CONSTRAINTS, *quickstart.PACKAGES]) > torch
    pins = (REPO / quickstart.CONSTRAINTS).read_text().split()
    assert quickstart.TORCH in pins  # torch pinned on every constrained pip call too
