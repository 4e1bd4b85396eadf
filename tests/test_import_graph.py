"""The packages' modules import each other without circles, counting imports inside functions too:
scripts over sdexport over the runtime, validate over conversion, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def module_imports(package: Path, name: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        module = ".".join((name, *parts)).removesuffix(".__init__")
        is_package = path.name == "__init__.py"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith(name):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith(name))
        graph[module] = found
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


@pytest.mark.parametrize(("folder", "name"), [("sdexport", "sdexport"), ("runtime/sdruntime", "sdruntime")])
def test_no_import_circles(folder, name):
    graph = module_imports(REPO / folder, name)
    # a package's __init__ re-exporting its modules is no circle
    graph = {m: {t for t in ts if t != name} for m, ts in graph.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_validate_depends_on_conversion_and_not_the_reverse():
    graph = module_imports(REPO / "sdexport", "sdexport")
    assert "sdexport.component_export" in graph["sdexport.fp32_fallback"]  # its re-exports take convert's path
    assert "sdexport.trace" in graph["sdexport.validate.divergence"]
    export_path = ("specs", "plan", "trace", "compare", "optimize", "precision", "component_export", "artifacts")
    for module in export_path:
        assert not {m for m in graph[f"sdexport.{module}"] if m.startswith("sdexport.validate")}, module
