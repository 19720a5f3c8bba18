"""The package's layers import downward only: data and sim at the bottom (with the shared
utilities), algos and planner above them, evaluate above those, the API, then the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import dosewise

PACKAGE = Path(dosewise.__file__).parent
# Lower number = lower layer; a module may import its own layer and the ones below it.
LAYERS = {
    "config": 0,
    "checkpoint": 0,
    "allocator": 0,
    "onednn": 0,
    "data": 0,
    "sim": 0,
    "algos": 1,
    "planner": 1,
    "evaluate": 2,
    "api": 3,
    "serve": 3,
    "cli": 4,
}


def layer_of(module: str) -> int:
    """The layer of `dosewise.<top>...`; the package root (`import dosewise`) is the bottom."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every dosewise import in the file, at any depth (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "dosewise" else [f"dosewise.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name == "dosewise" or name.startswith("dosewise.")]


def test_every_top_level_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert tops - {"__init__"} <= set(LAYERS), sorted(tops - set(LAYERS) - {"__init__"})


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "dosewise." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = layer_of(module.removesuffix(".__init__"))
        upward += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for line, name in imports(path) if layer_of(name) > own]
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dosewise.evaluate.anesthesia import closed_loop\n")
    assert imports(probe) == [(2, "dosewise.evaluate.anesthesia")]
    assert layer_of("dosewise.evaluate.anesthesia") > layer_of("dosewise.planner.policy")
