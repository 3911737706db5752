"""Why a spawned worker could not start, said in one line instead of a worker's traceback.

Spawned (and forkserver) workers import the user's main module again before they run any of
this library's code. Two scripts break that, and both used to end in "worker process N exited
with code None while starting" with the cause scrolling past as worker tracebacks:

- a script without ``if __name__ == "__main__":`` around the code that runs rounds: every
  worker runs it again at import and builds a pool of its own. `refuse_in_worker_import` makes
  such a worker exit at once with `EXIT_MAIN_REIMPORTED` (no traceback; spawn and forkserver
  alike), and the parent names the fix;
- a script fed on standard input (``python - < run.py``): there is no file to import again.
  `main_not_importable` says so in the parent, before any worker starts.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from multiprocessing import spawn
from multiprocessing.process import BaseProcess

# The exit status of a worker that stopped because importing the main module built a pool.
EXIT_MAIN_REIMPORTED = 86

_GUARD = 'put the code that runs rounds under `if __name__ == "__main__":`'


def _main_path() -> str | None:
    """The file spawned workers run as their main module, or None (imported by name, or none)."""
    data = spawn.get_preparation_data("blazefl-fn-worker")
    path = data.get("init_main_from_path")
    return path if isinstance(path, str) else None


def refuse_in_worker_import() -> None:
    """Exit quietly if this process is a worker still importing the user's main module.

    ``multiprocessing`` marks that phase with ``current_process()._inheriting`` (its own check
    for the same mistake reads it); tests/test_executors.py fails if that marker goes away.
    """
    if getattr(mp.current_process(), "_inheriting", False):
        # os._exit, not SystemExit: a forkserver child turns any exception, SystemExit
        # included, into status 1; nothing of this worker needs cleaning up yet.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_MAIN_REIMPORTED)


def main_not_importable() -> str | None:
    """Why workers could not import the main module again (a script read from standard
    input has no file), or None when they can."""
    path = _main_path()
    if path is not None and not os.path.isfile(path):
        return (
            f"worker processes cannot start: each imports the main module again from its file, "
            f"and this script has none ({os.path.basename(path)}); save it to a file and "
            f"{_GUARD}, or use Threads"
        )
    return None


def describe_exit(process: BaseProcess) -> str:
    """How ``process`` ended, after reaping it: never an unknown exit status."""
    process.join(timeout=5)
    code = process.exitcode
    if code is None:
        return "stopped answering (it is still running)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def start_failure(process: BaseProcess) -> str:
    """The one-line reason a worker died before it said it was ready."""
    how = describe_exit(process)
    if process.exitcode == EXIT_MAIN_REIMPORTED:
        path = _main_path() or "the main module"
        return (
            f"worker processes cannot start: each imports {path} again, and at import that "
            f"script builds a Processes pool itself; {_GUARD} (spawned workers need a main "
            "module they can import without running it)"
        )
    hint = ""
    path = _main_path()
    if process.exitcode == 1 and path is not None:
        hint = (
            f"; its traceback is above: if it shows {os.path.basename(path)} running again, "
            f"{_GUARD}"
        )
    return f"worker process {process.pid} {how} while starting{hint}"
