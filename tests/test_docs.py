"""The documentation site builds with ``--strict`` and documents every public name.

``mkdocs build --strict`` fails on any warning: a broken link or anchor, a reference to a
name that has no entry, a docstring griffe cannot parse. On top of that this file checks what
a warning would not: that each name in each public module's ``__all__`` has a rendered entry
(read from the site's ``objects.inv``), and that each has a docstring.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import blazefl_fn
import mkdocs_hooks  # beside mkdocs.yml at the repository root (pytest's pythonpath)

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    """Every importable module of the package whose dotted path has no ``_`` component."""
    names = ["blazefl_fn"]
    for info in pkgutil.walk_packages(blazefl_fn.__path__, "blazefl_fn."):
        if mkdocs_hooks.is_public(info.name):
            names.append(info.name)
    return names


def is_package(name: str) -> bool:
    return hasattr(importlib.import_module(name), "__path__")


def reference_page(name: str) -> Path:
    rel = name.split(".")[1:]
    if is_package(name):
        return ROOT / "docs" / "reference" / Path(*rel, "index.md")
    return ROOT / "docs" / "reference" / Path(*rel).with_suffix(".md")


def reference_html(name: str) -> str:
    """The site path of ``name``'s reference page (``use_directory_urls: false``)."""
    return reference_page(name).relative_to(ROOT / "docs").with_suffix(".html").as_posix()


def rendered_entries(site: Path) -> dict[str, str]:
    """Name -> page of every object a page renders, from the site's ``objects.inv``.

    The inventory is Sphinx's format: four header lines, then zlib-compressed lines
    ``name domain:role priority uri display``. Priority 1 marks the object's own entry;
    mkdocstrings also lists aliases (priority 2) that point at an entry rendered elsewhere.
    """
    data = (site / "objects.inv").read_bytes()
    start = 0
    for _ in range(4):
        start = data.index(b"\n", start) + 1
    entries: dict[str, str] = {}
    for line in zlib.decompress(data[start:]).decode().splitlines():
        name, role, priority, uri = line.split(" ", 4)[:4]
        if role.startswith("py:") and priority == "1":
            entries[name] = uri.split("#", 1)[0]
    return entries


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
    rendered = rendered_entries(site)
    missing: list[str] = []
    for name in public_modules():
        module = importlib.import_module(name)
        exports: list[str] = list(module.__all__)
        # A folder's __init__ may only say what lives there (its modules are the homes).
        assert exports or hasattr(module, "__path__"), f"{name} has an empty __all__"
        for export in exports:
            if is_package(name):
                # Package pages link each export to the entry of the module defining it.
                path = mkdocs_hooks.documented_path(mkdocs_hooks.export(name, export))
                if path not in rendered:
                    missing.append(f"{name}.{export} (-> {path})")
            elif rendered.get(f"{name}.{export}") != reference_html(name):
                missing.append(f"{name}.{export}")
    assert not missing, f"no rendered entry for {missing}"


def test_package_tables_link_each_name_to_the_object_it_is() -> None:
    # A submodule and a function can share a name (algorithms.dsfl); the table must link the
    # function that `from blazefl_fn.algorithms import dsfl` gives.
    for name in public_modules():
        if not is_package(name):
            continue
        module = importlib.import_module(name)
        for export in module.__all__:
            runtime = getattr(module, export)
            path = mkdocs_hooks.documented_path(mkdocs_hooks.export(name, export))
            if inspect.ismodule(runtime):
                assert path == runtime.__name__, (name, export, path)
            elif inspect.isclass(runtime) or inspect.isfunction(runtime):
                assert path.endswith("." + runtime.__qualname__), (name, export, path)
                owner = path.removesuffix("." + runtime.__qualname__)
                if not runtime.__module__.rsplit(".", 1)[-1].startswith("_"):
                    assert owner == runtime.__module__, (name, export, path)


def test_every_public_name_has_a_docstring() -> None:
    undocumented: list[str] = []
    for name in public_modules():
        if not mkdocs_hooks.module_named(name).docstring:
            undocumented.append(name)
        for export in importlib.import_module(name).__all__:
            if not mkdocs_hooks.resolved(mkdocs_hooks.export(name, export)).docstring:
                undocumented.append(f"{name}.{export}")
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_the_site_opened_from_the_disk_loads_its_search_index_as_a_script(site: Path) -> None:
    # Before: search fetched search/search_index.json, which a browser refuses from file://.
    script = (site / "search" / "search_index.js").read_text(encoding="utf-8")
    assert script.startswith("var __index = ")
    index = json.loads(script.removeprefix("var __index = "))
    titles = {doc["title"] for doc in index["docs"]}
    assert {"Changelog", "Command line", "blazefl_fn.run.simulate"} <= titles
    # Pages link each other as files (site/guide.html), not as directories a server resolves.
    assert 'href="guide.html"' in (site / "index.html").read_text(encoding="utf-8")
