"""The layer table of docs/ARCHITECTURE.md, kept true: every import in segreport/ (module level or inside a
function) goes to its own layer or one below, and module-level imports have no cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segreport"

# bottom to top, as docs/ARCHITECTURE.md lists them; one row may hold several packages
LAYERS = [
    {"errors", "vocab", "timing", "__init__"},
    {"data"},
    {"text"},
    {"transforms"},
    {"phantom"},
    {"networks"},
    {"losses", "metrics"},
    {"inference"},
    {"models"},
    {"run"},
    {"training"},
    {"label"},
    {"cli", "__main__", "demo"},
]


def _module(path: Path) -> str:
    return ".".join(("segreport",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The segreport modules ``path`` imports (``from x import name`` counts as x and x.name)."""
    tree = ast.parse(path.read_text())
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}")}
    return {m for m in found if m == "segreport" or m.startswith("segreport.")}


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    path = PACKAGE.joinpath(*parts) if parts else None
    return path is not None and (path.with_suffix(".py").is_file() or path.is_dir())


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its package is in no layer of docs/ARCHITECTURE.md")


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        for target in _imports(path, top_level_only=False):
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_module_level_imports_have_no_cycle():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = defaultdict(set)
    for module, path in modules.items():  # a package's __init__ re-exporting its own submodules is no cycle
        graph[module] = {t for t in _imports(path, top_level_only=True)
                         if t in modules and t != module and not t.startswith(module + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_relative_import_names_a_module_of_the_package():
    """A moved file's stale relative import (``from .. import x`` one level too high) fails only when that
    line runs; here it fails at once."""
    stale = []
    for path in sorted(PACKAGE.rglob("*.py")):
        package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            if not base or not (target == "segreport" or _is_module(target)):
                stale.append(f"{_module(path)}: from {'.' * node.level}{node.module or ''} import ...")
    assert not stale, "\n".join(stale)
