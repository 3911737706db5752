"""MkDocs hooks for the API reference: each package page lists what the package re-exports.

A line ``<!-- exports: blazefl_fn.data -->`` in a page becomes a table of that package's
``__all__``: each name links to the entry of the object it re-exports, on the page of the
public module that defines it, with the first paragraph of its docstring. Computed at build
time with griffe, so the tables cannot fall out of step with the code.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import griffe

_MARKER = re.compile(r"^<!-- exports: (?P<module>[\w.]+) -->$", re.MULTILINE)
_ROOT = Path(__file__).resolve().parent


@functools.cache
def _package() -> griffe.Module:
    loaded = griffe.load("blazefl_fn", search_paths=[str(_ROOT)], resolve_aliases=True)
    assert isinstance(loaded, griffe.Module)
    return loaded


def is_public(path: str) -> bool:
    """Whether no component of the dotted ``path`` starts with ``_``."""
    return not any(part.startswith("_") for part in path.split("."))


def resolved(obj: griffe.Object | griffe.Alias) -> griffe.Object:
    """The object at the end of ``obj``'s chain of re-exports."""
    return obj.final_target if isinstance(obj, griffe.Alias) else obj


def module_named(path: str) -> griffe.Module:
    """The griffe module at dotted ``path`` (``blazefl_fn`` or below)."""
    package = _package()
    found = package if path == package.path else package[path.split(".", 1)[1]]
    assert isinstance(found, griffe.Module), path
    return found


def export(module_path: str, name: str) -> griffe.Object | griffe.Alias:
    """What ``module_path`` exports as ``name``.

    griffe lists a submodule and a re-exported function of the same name (``algorithms.dsfl``
    the module, ``algorithms.dsfl`` the function) under one key, the submodule; the runtime
    attribute says which one ``__all__`` means.
    """
    member = module_named(module_path).members[name]
    runtime = getattr(importlib.import_module(module_path), name)
    if member.is_module and not inspect.ismodule(runtime):
        member = member.members[name]
    return member


def documented_path(obj: griffe.Object | griffe.Alias) -> str:
    """Where ``obj`` is rendered: the last public object on its chain of re-exports."""
    chosen = obj.path
    current: griffe.Object | griffe.Alias = obj
    while True:
        if is_public(current.path):
            chosen = current.path
        if not isinstance(current, griffe.Alias):
            return chosen
        current = current.target


def _summary(obj: griffe.Object | griffe.Alias) -> str:
    target = resolved(obj)
    if not target.docstring:
        return ""
    paragraph = target.docstring.value.strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split()).replace("|", "\\|")


def exports_table(module_path: str) -> str:
    """The Markdown table of ``module_path``'s ``__all__``."""
    rows = ["| name | what |", "|---|---|"]
    for entry in module_named(module_path).exports or ():
        # griffe keeps an ``__all__`` entry built from another module's as an expression.
        name = entry if isinstance(entry, str) else entry.name
        member = export(module_path, name)
        rows.append(f"| [`{name}`][{documented_path(member)}] | {_summary(member)} |")
    return "\n".join(rows)


def flag_ranges_table() -> str:
    """The Markdown table of the numeric ``run`` flags' accepted values."""
    from blazefl_fn.cli._flags import flag_ranges

    rows = ["| flag | accepted values |", "|---|---|"]
    rows += [f"| `{flag}` | {accepted} |" for flag, accepted in flag_ranges()]
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace every exports marker with its table, and the flag-ranges marker with its own."""
    markdown = _MARKER.sub(lambda m: exports_table(m["module"]), markdown)
    return markdown.replace("<!-- flag-ranges -->", flag_ranges_table())
