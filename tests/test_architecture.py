"""The package's shape, as docs/architecture.md states it: which package may import which (no arrow back up), no
import cycle between modules, and no function over 60 lines. Read from the source (AST), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "peft" / "src"
PACKAGE = SOURCE / "tlora"
MAX_FUNCTION_LINES = 60

# Layers, lowest first. A module may import its own layer's modules and lower layers', never a higher layer's.
LEAVES = ("tlora.data", "tlora.methods_table", "tlora.fixtures", "tlora.constants", "tlora.errors")
CORE = ("tlora.allocation", "tlora.config", "tlora.weights", "tlora.distributed", "tlora.targets", "tlora.calibration",
        "tlora.initialization", "tlora.model", "tlora.pipeline", "tlora.plan_report", "tlora.outputs", "tlora.resume",
        "tlora.export")
FORBIDDEN = {
    # what each group must never import
    LEAVES: ("tlora.allocation", "tlora.config", "tlora.calibration", "tlora.model", "tlora.pipeline",
             "tlora.training", "tlora.evaluation", "tlora.demo"),
    CORE: ("tlora.training", "tlora.evaluation", "tlora.demo", "tlora.fixtures"),
    ("tlora.training",): ("tlora.evaluation", "tlora.demo", "tlora.fixtures"),
    # evaluation scores any model: it never needs the method's core or the training code
    ("tlora.evaluation",): ("tlora.training", "tlora.demo", "tlora.fixtures", "tlora.calibration", "tlora.pipeline",
                            "tlora.model", "tlora.resume", "tlora.initialization", "tlora.allocation"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The tlora modules `name` imports at any depth of its source (`from . import x` counts as importing x)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules or ({target} if target.startswith("tlora") else set())
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tlora")}
    return found - {name}


def _within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_the_layers_cover_every_subpackage():
    groups = [p for prefixes in FORBIDDEN for p in prefixes] + ["tlora.demo"]
    unplaced = [m for m in MODULES if m != "tlora" and not _within(m, groups)]
    assert not unplaced, f"place these modules in a layer of tests/test_architecture.py and docs/architecture.md: {unplaced}"


@pytest.mark.parametrize("group", list(FORBIDDEN), ids=lambda g: g[0])
def test_no_import_points_back_up(group):
    wrong = [(module, target) for module in MODULES if _within(module, group)
             for target in imported_modules(module) if _within(target, FORBIDDEN[group])]
    assert not wrong, f"imports that point up a layer: {wrong}"


def test_no_import_cycle_between_modules():
    graph = {m: {t for t in imported_modules(m) if t in MODULES and t != "tlora" and not t.endswith("__main__")}
             for m in MODULES if m != "tlora"}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                if not all(_is_package(m) for m in cycle[:-1]):  # a package's __init__ re-exporting is no cycle
                    raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"split these into named steps: {long}"
