"""The command line as a user runs it: ``python -m blazefl_fn ...`` with its output captured.

`run_cli` starts a fresh interpreter: for what only a process shows (no traceback reaches the
terminal, signals, the exit status the shell sees, restarts with pins). `run_inline` calls the
same entry point in the test's own process and returns the same record; it saves the ~2 s of
CPU an interpreter importing torch costs, so tests of what the command prints and which status
it returns use it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

# A command run with its fixed flags bound: ``cli(*more_flags)`` -> status, stdout, stderr.
Run = Callable[..., subprocess.CompletedProcess[str]]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``blazefl-fn ARGS`` in a fresh interpreter; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "blazefl_fn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_inline(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``blazefl_fn.cli.main(ARGS)`` in this process, as `run_cli`'s record (status, out, err)."""
    from blazefl_fn.cli import main

    capsys.readouterr()  # only what this call prints
    status = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(
        ["blazefl-fn", *args], status, stdout=captured.out, stderr=captured.err
    )
