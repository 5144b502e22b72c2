"""The package's import graph, read from the sources: no circle anywhere, and core's layers import only downwards.

Every ``import``/``from ... import`` statement of every module counts, those under ``if TYPE_CHECKING:`` and inside
functions included (a circle that only type checkers or a lazy import follow is still a circle for a reader).
``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_gradguard

ROOT = Path(lightning_gradguard.__file__).parent
PKG = "lightning_gradguard"

#: what each layer of core may import (besides itself, ``core._arg_checks`` and ``lightning_gradguard.errors``)
LAYERS = {
    "measure": set(),
    "clip": {"measure"},
    "guard": {"measure", "clip"},
    "recover": {"measure", "clip", "guard"},
    "engine": {"measure", "clip", "guard", "recover"},
}


def _module_name(path: Path) -> str:
    parts = [PKG, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, this: str, modules: dict[str, Path]) -> set[str]:
    out: set[str] = set()
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith(PKG):
                target = _resolve(name, modules)
                if target is not None and target != this:
                    out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_circle_anywhere_in_the_package():
    graph = _graph()
    assert len(graph) > 60
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_core_layers_import_only_downwards(layer):
    allowed = {f"{PKG}.core.{x}" for x in (*LAYERS[layer], layer)} | {f"{PKG}.core._arg_checks", f"{PKG}.errors"}
    prefix = f"{PKG}.core.{layer}"
    bad = []
    for module, targets in _graph().items():
        if module != prefix and not module.startswith(prefix + "."):
            continue
        for target in targets:
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_core_imports_nothing_outside_core():
    for module, targets in _graph().items():
        if module.startswith(f"{PKG}.core"):
            outside = [t for t in targets if not t.startswith(f"{PKG}.core") and t != f"{PKG}.errors"]
            assert not outside, (module, outside)
