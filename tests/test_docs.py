"""The documentation site builds with ``--strict`` and documents every public name.

``mkdocs build --strict`` fails on any warning: a broken link or anchor, a reference to a
name that has no entry, a docstring griffe cannot parse. On top of that this file checks what
a warning would not: that each name in each public module's ``__all__`` has a rendered entry
(read from the site's ``objects.inv``), and that each has a docstring.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import zlib
from pathlib import Path

import griffe
import pytest

import blazefl_fn
import mkdocs_hooks  # beside mkdocs.yml at the repository root (pytest's pythonpath)

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    """Every importable module of the package whose dotted path has no ``_`` component."""
    names = ["blazefl_fn"]
    for info in pkgutil.walk_packages(blazefl_fn.__path__, "blazefl_fn."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def is_package(name: str) -> bool:
    return hasattr(importlib.import_module(name), "__path__")


def reference_page(name: str) -> Path:
    rel = name.split(".")[1:]
    if is_package(name):
        return ROOT / "docs" / "reference" / Path(*rel, "index.md")
    return ROOT / "docs" / "reference" / Path(*rel).with_suffix(".md")


def inventory(site: Path) -> set[str]:
    """The Python names in a Sphinx-style ``objects.inv`` (four header lines, then zlib)."""
    data = (site / "objects.inv").read_bytes()
    start = 0
    for _ in range(4):
        start = data.index(b"\n", start) + 1
    lines = zlib.decompress(data[start:]).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines if " py:" in line}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    warnings = [line for line in done.stderr.splitlines() if not line.startswith("INFO")]
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings)
    return out


def test_every_public_module_has_a_reference_page_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for name in public_modules():
        page = reference_page(name)
        assert page.is_file(), f"{name} has no reference page {page.relative_to(ROOT)}"
        assert f"::: {name}\n" in page.read_text(), f"{page} does not render {name}"
        assert f": {page.relative_to(ROOT / 'docs').as_posix()}\n" in config, (
            f"{page.relative_to(ROOT)} is not in mkdocs.yml's nav"
        )


def test_every_public_name_has_a_rendered_entry(site: Path) -> None:
    rendered = inventory(site)
    package = griffe.load("blazefl_fn", search_paths=[str(ROOT)], resolve_aliases=True)
    assert isinstance(package, griffe.Module)
    missing: list[str] = []
    for name in public_modules():
        module = importlib.import_module(name)
        exports: list[str] = list(module.__all__)
        assert exports, f"{name} has an empty __all__"
        for export in exports:
            if is_package(name):
                # Package pages link each export to the entry of the module defining it.
                member = package if name == "blazefl_fn" else package[name.split(".", 1)[1]]
                path = mkdocs_hooks.documented_path(member.members[export])
            else:
                path = f"{name}.{export}"
            if path not in rendered:
                missing.append(path)
    assert not missing, f"no rendered entry for {missing}"


def test_every_public_name_has_a_docstring() -> None:
    package = griffe.load("blazefl_fn", search_paths=[str(ROOT)], resolve_aliases=True)
    assert isinstance(package, griffe.Module)
    undocumented: list[str] = []
    for name in public_modules():
        module = package if name == "blazefl_fn" else package[name.split(".", 1)[1]]
        if not module.docstring:
            undocumented.append(name)
        for export in importlib.import_module(name).__all__:
            member = module.members[export]
            target = member.final_target if isinstance(member, griffe.Alias) else member
            if not target.docstring:
                undocumented.append(f"{name}.{export}")
    assert not undocumented, f"public names without a docstring: {undocumented}"
