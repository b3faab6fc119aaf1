"""The layers show in the tree: the method layer (torch + transformers) <- the FLOPs model <- the method chooser <-
the lmms-eval model <- the pipeline; nothing imports a layer above its own, and no module imports itself back
through others (function-level imports included), read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the order of the layers, lowest first; a module's layer is the first prefix it matches, else the method layer
LAYERS = ("vtw.flops", "vtw.choose", "vtw.lmms", "vtw.pipeline")


def _layer(module: str) -> int:
    for i, prefix in reversed(list(enumerate(LAYERS))):
        if module == prefix or module.startswith(prefix + "."):
            return i + 1
    return 0


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "vtw").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: vtw modules it imports}``, at any depth of its code (a lazy import is still an import)."""
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                continue
            edges[module] |= {n for n in names if n in modules and n != module}
    return edges


def test_no_module_imports_a_layer_above_its_own():
    edges = _imports(_modules())
    upward = sorted(f"{m} -> {t}" for m, targets in edges.items() for t in targets if _layer(t) > _layer(m))
    assert not upward, upward


def test_no_import_cycle():
    edges = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize(
    ("importer", "imported", "upward"),
    [("vtw.methods.fastv", "vtw.flops.count", True), ("vtw.pipeline.job", "vtw.lmms.model", False)],
)
def test_the_layer_order_itself(importer, imported, upward):
    assert (_layer(imported) > _layer(importer)) is upward
