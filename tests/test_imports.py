"""The gateway's modules import one another one way: no circle, even through imports made only
for type checking or inside a function (a circle there still ties the modules' designs
together, and turns into an import error the day one of them is needed at module level)."""

from __future__ import annotations

import ast
from pathlib import Path

import harken

PACKAGE = Path(harken.__file__).parent


def package_modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name (``harken.stt.base``) → (file, is a package)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def package_imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package → the modules of the package it imports, wherever the import
    statement is (module level, a function, ``if TYPE_CHECKING``). ``from . import x`` counts
    as importing the submodule ``x`` when there is one; the parent packages that Python runs
    first are not counted (each submodule would otherwise "import" its package's ``__init__``)."""
    modules = package_modules(root)
    edges: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        edges[name] = set()
        for target in targets:
            while target and target not in modules:     # harken.stt.base.Word → harken.stt.base
                target = target.rpartition(".")[0]
            if target and target != name:
                edges[name].add(target)
    return edges


def module_imports(folder: str) -> dict[str, set[str]]:
    """Each module of ``harken/<folder>`` → the modules of that folder it imports (short names)."""
    prefix = f"harken.{folder}."
    return {name.removeprefix(prefix): {t.removeprefix(prefix) for t in targets
                                         if t.startswith(prefix) and "." not in t.removeprefix(prefix)}
            for name, targets in package_imports().items()
            if name.startswith(prefix) and "." not in name.removeprefix(prefix)}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import circles, each as the path that closes it (depth-first search). Not every circle
    through a module is listed, but there is at least one whenever the graph has a circle."""
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(edges.get(name, ())):
            if target in path:
                found.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(name)

    for name in sorted(edges):
        if name not in done:
            visit(name, [name])
    return found


def _shown(found: list[list[str]]) -> str:
    return "\n".join(" → ".join(circle) for circle in found)


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_reads_every_form_of_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .sub import leaf\n")
    (package / "top.py").write_text("import pkg.sub.leaf\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import other\nif TYPE_CHECKING:\n    from ..top import x\n")
    (package / "sub" / "other.py").write_text("def f():\n    from .leaf import g\n    from pkg import top\n")
    assert package_imports(package) == {
        "pkg": {"pkg.sub.leaf"}, "pkg.top": {"pkg.sub.leaf"}, "pkg.sub": set(),
        "pkg.sub.leaf": {"pkg.sub.other", "pkg.top"}, "pkg.sub.other": {"pkg.sub.leaf", "pkg.top"}}


def test_gateway_modules_import_each_other_without_a_circle():
    edges = module_imports("gateway")
    assert {"context", "metrics", "session"} <= set(edges)       # the finder reads the real folder
    assert "context" in edges["session"]
    assert circles(edges) == []


def test_stt_modules_import_each_other_without_a_circle():
    """The providers use what a stream reports through (``word_queue``), the failover uses
    ``base.Link``, and only ``selection`` knows the providers (it builds them)."""
    edges = module_imports("stt")
    assert {"deepgram", "null", "selection", "fallback"} <= set(edges)
    assert "null" in edges["selection"]                      # a lazy import is still read
    found = circles(edges)
    assert found == [], "import circles in harken/stt:\n" + _shown(found)


def test_the_whole_package_has_no_import_circle():
    edges = package_imports()
    assert "harken.stt.base" in edges["harken.stt.fallback"]
    found = circles(edges)
    assert found == [], "import circles in harken:\n" + _shown(found)
