"""The tree shows the layers, and imports only go down: data → models → method → step → trainer → cli.

Every ``import`` of an ``ffsd_fast`` module anywhere in a module (top level or inside a function) is checked, so a
lazy import cannot hide a dependency that runs back up a layer, and there is no import circle between modules.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ffsd_fast"

# The layers, lowest first. A module may import from its own layer and from the layers before it.
LAYERS = ["errors", "files", "data", "models", "method", "step", "trainer", "cli", "entry"]
ENTRY_POINTS = {"ffsd_fast.train", "ffsd_fast.report"}  # thin scripts above the CLI


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str | None:
    """The layer of an ``ffsd_fast`` module, or None for the package itself."""
    if module in ENTRY_POINTS:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: pathlib.Path) -> set[str]:
    """Every ffsd_fast module that ``path`` imports (``from ffsd_fast.x import y`` counts ``ffsd_fast.x.y`` when
    that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ffsd_fast")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ffsd_fast"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_top_level_shows_the_layers():
    top = {p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", "."))}
    assert top == {
        "errors.py",
        "files.py",
        "data",
        "models",
        "method",
        "step",
        "trainer",
        "cli",
        "train.py",
        "report.py",
    }
    for module in MODULES:
        assert layer(module) in (None, *LAYERS), module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    own = LAYERS.index(layer(module)) if layer(module) else len(LAYERS)
    upward = [m for m in imports(MODULES[module]) if layer(m) and LAYERS.index(layer(m)) > own]
    assert not upward, f"{module} ({layer(module)}) imports from a later layer: {upward}"


def test_no_import_circle():
    graph = {m: {i for i in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # A package's __init__ is imported with each of its modules: an edge to ffsd_fast.x.y also enters ffsd_fast.x.
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in graph[module]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " → ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_check_catches_an_upward_import(tmp_path):
    # The rule itself: a data module importing the trainer is refused, and a lazy import inside a function counts.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ffsd_fast.trainer import checkpoint\n")
    assert "ffsd_fast.trainer.checkpoint" in imports(bad)
    assert LAYERS.index(layer("ffsd_fast.trainer.checkpoint")) > LAYERS.index(layer("ffsd_fast.data.loaders"))
