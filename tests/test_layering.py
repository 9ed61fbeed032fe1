"""The package's layering: dependencies point one way, no import circles, light model imports.

layers <- models <- (preprocess, data, captions, rollout, timm interop) <- engine <- commands.
The graph is read from the source with ``ast`` (every import, also those inside functions, except
the ones under ``if TYPE_CHECKING:``, which never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vit"

# Longest matching prefix wins. A module may import its own level or any below it.
LEVELS = {
    "vit": 0,
    "vit.errors": 0,
    "vit.fileio": 0,
    "vit.preprocess": 0,
    "vit.layers": 1,
    "vit.models": 2,
    "vit.data": 3,
    "vit.captions": 3,
    "vit.rollout": 3,
    "vit.timm_interop": 3,
    "vit.engine": 4,
    "vit.rollout.__main__": 5,
    "vit.train": 5,
    "vit.evaluate": 5,
    "vit.predict": 5,
    "vit.export": 5,
    "vit.caption": 5,
}
HEAVY = ("timm", "torchvision", "huggingface_hub", "tensorboard", "albumentations")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if id(n) not in skip]


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from vit import timm_interop` imports the module vit.timm_interop
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _level(module: str) -> int:
    prefix = max((p for p in LEVELS if module == p or module.startswith(p + ".")), key=len)
    return LEVELS[prefix]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_circle() -> None:
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_find_cycle_finds_one() -> None:
    # The checker itself: a circle through three modules is found, a chain is not.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_has_a_level() -> None:
    assert all(any(m == p or m.startswith(p + ".") for p in LEVELS) for m in _modules())


def test_no_layer_imports_a_layer_above_it() -> None:
    upward = [
        f"{module} (level {_level(module)}) imports {dep} (level {_level(dep)})"
        for module, deps in import_graph().items()
        for dep in deps
        if _level(dep) > _level(module)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("modules", ["vit.models", "vit.layers", "vit.rollout"])
def test_library_imports_stay_light(modules: str) -> None:
    """In a clean interpreter, importing the library loads no heavy dependency and no engine."""
    code = (
        f"import sys, {modules}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
        "or m.startswith('vit.engine')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_timm_interop_registers_our_variants_in_timm() -> None:
    code = (
        "import timm; assert not timm.list_models('vitpkg_*'); import vit.models; "
        "assert not timm.list_models('vitpkg_*'); import vit.timm_interop; "
        "print(len(timm.list_models('vitpkg_*')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert int(result.stdout) > 0, result.stderr
