"""MkDocs hooks for the API reference: each package page lists what the package re-exports.

A line ``<!-- exports: blazefl_fn.data -->`` in a page becomes a table of that package's
``__all__``: each name links to the entry of the module that defines it (the first public
module on its import chain), with the first line of its docstring. Computed at build time
with griffe, so the tables cannot fall out of step with the code.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import griffe

_MARKER = re.compile(r"^<!-- exports: (?P<module>[\w.]+) -->$", re.MULTILINE)


@functools.cache
def _package() -> griffe.Module:
    loaded = griffe.load("blazefl_fn", search_paths=["."], resolve_aliases=True)
    assert isinstance(loaded, griffe.Module)
    return loaded


def _public(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


def documented_path(obj: griffe.Object | griffe.Alias) -> str:
    """Where ``obj`` is rendered: the last public object on its chain of re-exports."""
    chosen = obj.path
    current: griffe.Object | griffe.Alias = obj
    while True:
        if _public(current.path):
            chosen = current.path
        if not isinstance(current, griffe.Alias):
            return chosen
        current = current.target


def _summary(obj: griffe.Object | griffe.Alias) -> str:
    target = obj.final_target if isinstance(obj, griffe.Alias) else obj
    text = target.docstring.value.strip().splitlines()[0] if target.docstring else ""
    return text.replace("|", "\\|")


def exports_table(module_path: str) -> str:
    """The Markdown table of ``module_path``'s ``__all__``."""
    package = _package()
    module = package if module_path == package.path else package[module_path.split(".", 1)[1]]
    rows = ["| name | what |", "|---|---|"]
    for export in module.exports or ():
        # griffe keeps an ``__all__`` entry built from another module's as an expression.
        name = export if isinstance(export, str) else export.name
        member = module.members[name]
        rows.append(f"| [`{name}`][{documented_path(member)}] | {_summary(member)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace every exports marker with its table."""
    return _MARKER.sub(lambda m: exports_table(m["module"]), markdown)
