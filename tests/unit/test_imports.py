"""The package's import graph: no cycles, and every import points down the pipeline's layers.

Walks every ``import`` / ``from ... import`` of ``src/peagle`` (function-local ones included) with `ast`,
so a cycle hidden in a function body counts too. Importing ``peagle.a.b`` also runs ``peagle/a/__init__``,
so an import is an edge to the module and to each package above it (other than the importer's own).
The layers (docs/internals.md) run from `util` (imports nothing of peagle) up to `cli`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peagle

PACKAGE = Path(peagle.__file__).parent
# lowest first: a module may import its own layer's modules and those of the layers below
LAYERS = ["util", "config", "data", "model", "target", "store", "eval", "run", "regenerate", "demo", "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of peagle that ``name`` imports (ancestors included, its own packages excluded)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target != "peagle" and not target.startswith("peagle."):
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the module and the packages above it (not `peagle` itself)
                mod = ".".join(parts[:i])
                if mod in modules and mod != name and not name.startswith(mod + "."):
                    found.add(mod)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path, or None (depth-first search, colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_cycle_and_an_upward_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _layer("peagle.model.step") > _layer("peagle.data.shift") > _layer("peagle.util.files")
    fake = PACKAGE / "model" / "draft.py"
    assert "peagle.run.train" not in _imports("peagle.model.draft", fake, _modules())


def test_every_module_sits_in_a_layer():
    strays = sorted(m for m in _graph() if m != "peagle" and _layer(m) == len(LAYERS))
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_point_down(module):
    if module == "peagle":  # the lazy public names (import_module by string)
        return
    up = sorted(m for m in _graph()[module] if _layer(m) > _layer(module))
    assert not up, f"{module} imports a higher layer: {up}"
