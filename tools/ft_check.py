"""Checks that this interpreter runs blazefl_fn and its test tools with the GIL off.

On a free-threaded CPython, importing an extension module that has not declared it can run
without the GIL turns the GIL back on for the whole process (with a RuntimeWarning). This imports
what the test suite imports, one module at a time, and names the first module after which the
GIL is on. Exit 0 when the GIL is still off at the end; 1 with the culprit named otherwise.

Run: `.venv-ft/bin/python tools/ft_check.py [MODULE ...]` (modules named are imported last).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import sysconfig
import warnings

# Third-party first (the usual culprits), then every module of the package.
THIRD_PARTY = (
    "numpy",
    "torch",
    "torch.nn",
    "torch.func",
    "attrs",
    "typing_extensions",
    "hypothesis",
    "pytest",
    "scipy",
    "opacus",
)


def gil_enabled() -> bool:
    """Whether the GIL is on now (always True on a default build)."""
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())


def package_modules() -> list[str]:
    """Every module of blazefl_fn, in a stable order."""
    import blazefl_fn

    names = ["blazefl_fn"]
    for info in pkgutil.walk_packages(blazefl_fn.__path__, "blazefl_fn."):
        if not info.name.endswith(".__main__"):  # importing it would run the command line
            names.append(info.name)
    return sorted(names)


def gil_override() -> str | None:
    """How the GIL was forced on or off for this process (``PYTHON_GIL``, ``-X gil``), if it was.

    Forcing it off would hide an extension that needs it; forcing it on measures nothing.
    """
    if os.environ.get("PYTHON_GIL") is not None:
        return f"PYTHON_GIL={os.environ['PYTHON_GIL']}"
    options: dict[str, object] = getattr(sys, "_xoptions", {})
    if "gil" in options:
        return f"-X gil={options['gil']}"
    return None


def _culprit(name: str) -> bool:
    """Import ``name``; report and return True if the GIL is on afterwards."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.import_module(name)
    if not gil_enabled():
        return False
    reasons = "; ".join(str(w.message) for w in caught if "GIL" in str(w.message))
    print(
        f"ft-check: the GIL was enabled while importing {name!r}: "
        f"{reasons or 'no warning named the extension'}",
        file=sys.stderr,
    )
    return True


def main(extra: list[str]) -> int:
    """Check this interpreter; ``extra`` names more modules to import last. Returns the status."""
    if sysconfig.get_config_var("Py_GIL_DISABLED") != 1:
        print(f"ft-check: {sys.executable} is not a free-threaded build", file=sys.stderr)
        return 1
    override = gil_override()
    if override is not None:
        print(f"ft-check: unset {override}: it overrides what extensions declare", file=sys.stderr)
        return 1
    if gil_enabled():
        print("ft-check: the GIL is on before any import", file=sys.stderr)
        return 1
    # Third-party libraries before the package, whose import would load them unattributed.
    if any(_culprit(name) for name in THIRD_PARTY):
        return 1
    if any(_culprit(name) for name in (*package_modules(), *extra)):
        return 1
    import torch

    print(
        f"ft-check: GIL off after importing {len(THIRD_PARTY)} libraries and "
        f"{len(package_modules())} blazefl_fn modules (Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, sys._is_gil_enabled() = {gil_enabled()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
