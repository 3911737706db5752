"""The package's layout keeps its rules: folders by role, one home per name, imports one way.

Read from the source with `ast` (module-level imports; imports inside functions are lazy by
design and left out), so a rule broken anywhere in ``blazefl_fn/`` fails here with its place.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "blazefl_fn"

LAYERS: dict[str, int] = {
    # The core every layer may use: keys, trees, records, errors, models, numerics.
    "_validators": 0, "_files": 0, "keys": 0, "tree": 0, "records": 0, "errors": 0,
    "portable": 0, "models": 0,
    "data": 1,  # datasets, partitions, augmentation
    "client": 2,  # what a client runs
    "server": 3,  # what the server does between rounds
    "executors": 4,  # where clients run
    "round": 5,  # one round: sample -> broadcast -> clients (in an executor) -> aggregate
    "algorithms": 6,  # rounds' stages composed into named algorithms
    "privacy": 7,  # DP as stages over the FedAvg family
    "run": 8,  # whole simulations: config, loop, checkpoints, logs
    "cli": 9, "testing": 9,
}  # fmt: skip
"""Every top-level module or folder and its layer: an import never goes to a higher layer."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports at module level (``from . import x`` gives x)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.split(".")[0] == "blazefl_fn":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "blazefl_fn"}
    return found - {name}


GRAPH = {name: _imports(name) for name in MODULES}


def _unit(module: str) -> str:
    """The top-level module or folder ``module`` belongs to."""
    return module.split(".")[1] if "." in module else ""


def test_the_top_level_holds_at_most_twelve_files() -> None:
    files = sorted(p.name for p in ROOT.iterdir() if p.is_file())
    assert len(files) <= 12, files


def test_every_folder_says_what_lives_there() -> None:
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder.name}/ has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc is not None, f"{folder.name}/__init__.py has no docstring"
        assert len(doc.split()) >= 30, f"{folder.name}/__init__.py: {doc!r}"


def test_every_top_level_unit_has_a_layer() -> None:
    units = {_unit(m) for m in MODULES} - {""}
    assert units <= set(LAYERS) | {"__main__"}, sorted(units - set(LAYERS))


def test_no_import_goes_up_a_layer() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        source = _unit(module)
        if source in ("", "__main__"):
            continue  # the package's surface and entry point import from every layer
        for target in targets:
            unit = _unit(target)
            if unit and unit != source and LAYERS[unit] > LAYERS[source]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_module_imports_form_no_cycle() -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_no_private_module_is_imported_from_outside_its_folder() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            *folder, last = target.split(".")
            if last.startswith("_") and not last.startswith("__"):
                here = module.split(".")
                if here[: len(folder)] != folder:
                    wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(n for n in MODULES if "._" not in n))
def test_a_public_module_exports_only_names_it_is_the_home_of(name: str) -> None:
    """A name in ``__all__`` is defined in the module or in a private module of its folder;
    a folder's ``__init__`` (and the package's, the flat ``fl.*`` surface) may also gather the
    names of the modules below it."""
    module = importlib.import_module(name)
    folder = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for export in getattr(module, "__all__", ()):
        obj = getattr(module, export)
        if inspect.ismodule(obj):
            continue
        home = getattr(obj, "__module__", None)
        if not isinstance(home, str) or not home.startswith("blazefl_fn"):
            continue  # a constant or a type alias: no home to check
        if home == name or (MODULES[name].name == "__init__.py" and home.startswith(f"{name}.")):
            continue
        private = home.rpartition(".")[0] == folder and home.rpartition(".")[2].startswith("_")
        assert private, f"{name}.{export} is defined in {home}: it has another public home"
