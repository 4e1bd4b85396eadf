"""The packages' code keeps the shape docs/architecture.md describes: short functions, and other libraries'
quirks handled in scoped blocks, never by patching a library or changing the whole process."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sdexport", "runtime/sdruntime")
MAX_FUNCTION_LINES = 80


def package_files() -> list[Path]:
    return sorted(path for folder in PACKAGES for path in (REPO / folder).rglob("*.py"))


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def dotted(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain or a name, else ""."""
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return node.id if isinstance(node, ast.Name) else ""


def long_functions(tree: ast.Module) -> list[tuple[str, int]]:
    """(name, lines) of each function longer than the limit, from its `def` line (decorators not counted)."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def unscoped_calls(tree: ast.Module) -> list[str]:
    """Calls that change the process for good: patching, the working directory, warning filters set outside
    a `with warnings.catch_warnings()` block, logging filters added at a module's top level."""
    found = []

    def visit(node: ast.AST, in_catch: bool, top_level: bool) -> None:
        if isinstance(node, (ast.With, ast.AsyncWith)):
            in_catch = in_catch or any(
                isinstance(item.context_expr, ast.Call) and dotted(item.context_expr.func).endswith("catch_warnings")
                for item in node.items
            )
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            top_level = False
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name.endswith(("mock.patch", "mock.patch.object", "mock.patch.dict")) or name == "os.chdir":
                found.append(f"line {node.lineno}: {name}")
            if name in ("warnings.filterwarnings", "warnings.simplefilter") and not in_catch:
                found.append(f"line {node.lineno}: {name} outside warnings.catch_warnings()")
            if isinstance(node.func, ast.Attribute) and node.func.attr == "addFilter" and top_level:
                found.append(f"line {node.lineno}: addFilter at import")
        for child in ast.iter_child_nodes(node):
            visit(child, in_catch, top_level)

    visit(tree, False, True)
    if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "unittest" in ast.unparse(n) for n in ast.walk(tree)):
        found.append("imports unittest (mock)")
    return found


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_80_lines(path):
    assert long_functions(parsed(path)) == []


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_quirks_are_scoped(path):
    assert unscoped_calls(parsed(path)) == []


def test_the_checks_find_what_they_look_for():
    source = "\n".join(
        [
            "import os, warnings, logging",
            "from unittest import mock",
            "logging.getLogger('x').addFilter(lambda r: True)",
            "def f():",
            *["    x = 1"] * MAX_FUNCTION_LINES,
            "    os.chdir('/')",
            "    warnings.filterwarnings('ignore')",
            "    with mock.patch.object(os, 'sep', '/'):",
            "        pass",
            "    with warnings.catch_warnings():",
            "        warnings.simplefilter('ignore')",
        ]
    )
    tree = ast.parse(source)
    assert long_functions(tree) == [("f", MAX_FUNCTION_LINES + 7)]
    found = unscoped_calls(tree)
    assert [line.split(": ", 1)[-1] for line in found] == [
        "addFilter at import",
        "os.chdir",
        "warnings.filterwarnings outside warnings.catch_warnings()",
        "mock.patch.object",
        "imports unittest (mock)",
    ]


@pytest.mark.parametrize("folder", ["pyproject.toml", "runtime/pyproject.toml"])
def test_every_package_is_in_the_wheel(folder):
    """pyproject.toml lists sdexport's packages by hand (models/ installs as sdexport.models): each folder
    with an __init__.py must be listed, or the wheel would miss it."""
    config = tomllib.loads((REPO / folder).read_text())["tool"]["setuptools"]
    root = (REPO / folder).parent
    name = "sdruntime" if folder.startswith("runtime") else "sdexport"
    on_disk = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / name).rglob("__init__.py")
        if "__pycache__" not in str(p)
    }
    if "packages" in config and isinstance(config["packages"], list):
        assert on_disk <= set(config["packages"]), sorted(on_disk - set(config["packages"]))
    else:  # found by setuptools itself
        assert config["packages"]["find"]["include"] == [f"{name}*"]
