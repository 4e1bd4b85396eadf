"""README's set-up lines install what README's test command needs, and CI runs exactly those lines."""

from __future__ import annotations

import re
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


def test_ci_runs_readme_lines_as_they_stand():
    assert readme_block("Tests").strip() == 'python -m pytest -q -m "not slow"'
    ci = (REPO / ".ci" / "run").read_text()
    assert 'setup=$(readme_block "Set up")' in ci and 'eval "$setup"' in ci
    assert 'tests=$(readme_block "Tests")' in ci and 'eval "$tests"' in ci
    assert "pytest" not in ci.split('eval "$tests"')[0]  # no test run of its own before README's
