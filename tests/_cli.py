"""The command line as a user runs it: ``python -m blazefl_fn ...`` with its output captured."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``blazefl-fn ARGS`` in a fresh interpreter; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "blazefl_fn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
