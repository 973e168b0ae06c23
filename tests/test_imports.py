"""The gateway's modules import one another one way: no circle, even through imports made only
for type checking (a circle there still ties the modules' designs together, and turns into an
import error the day one of them is needed at run time)."""

from __future__ import annotations

import ast
from pathlib import Path

import harken

PACKAGE = Path(harken.__file__).parent


def module_imports(folder: str) -> dict[str, set[str]]:
    """Each module of ``harken/<folder>`` → the modules of that folder it imports."""
    names = {path.stem for path in (PACKAGE / folder).glob("*.py")} - {"__init__"}
    edges: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((PACKAGE / folder / f"{name}.py").read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:             # from .context import Gateway
                    found.add(node.module.split(".")[0])
                elif node.level == 1:                           # from . import events
                    found.update(alias.name for alias in node.names)
                elif node.level == 0 and node.module and node.module.startswith(f"harken.{folder}."):
                    found.add(node.module.split(".")[2])
        edges[name] = (found & names) - {name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (depth-first search)."""
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(edges[name]):
            if target in path:
                found.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(name)

    for name in sorted(edges):
        if name not in done:
            visit(name, [name])
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_gateway_modules_import_each_other_without_a_circle():
    edges = module_imports("gateway")
    assert {"context", "metrics", "session"} <= set(edges)       # the finder reads the real folder
    assert "context" in edges["session"]
    assert circles(edges) == []
