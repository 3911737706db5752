"""How the ``blazefl-fn`` command takes signals: one line, the documented status, no traceback.

- While the command is still importing torch (a second or more), Ctrl-C ends it at once with
  "blazefl-fn: interrupted" and status 130: nothing has started that needs stopping.
  Importing this module (the first thing the package's ``__init__`` does) arms it
  (`guard_import`), only in a process launched as the command (``blazefl-fn ...`` or
  ``python -m blazefl_fn ...``); a library user's Ctrl-C is left alone.
- Once `main` runs (`while_running`): SIGTERM is handled like Ctrl-C, as a `Terminated`
  (a `KeyboardInterrupt`, so every cleanup path that handles Ctrl-C handles it), ending with
  status 143. A second Ctrl-C while the first is being handled (workers stopping, a final
  checkpoint being written) is not an exception in the middle of that cleanup: it says that
  the run is stopping, and a third ends the process at once. And a worker killed while it
  fetched a shared descriptor from this process (``--client-timeout``) is not a traceback from
  multiprocessing's descriptor-sharing thread: the run reports that worker in its own line.

Standard library only: it runs before torch is imported.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from types import FrameType, TracebackType

PROG = "blazefl-fn"
INTERRUPTED, TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that the same cleanup runs."""


def launched_as_cli() -> bool:
    """Whether this process is the ``blazefl-fn`` command (either way of starting it)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 == PROG:
        return True
    orig: list[str] = getattr(sys, "orig_argv", [])
    return any(pair == ("-m", "blazefl_fn") for pair in itertools.pairwise(orig))


def _say(line: str) -> None:
    os.write(2, f"{PROG}: {line}\n".encode())


def _exit_at_once(_signum: int, _frame: FrameType | None) -> None:
    _say("interrupted")
    os._exit(INTERRUPTED)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def guard_import() -> None:
    """Make Ctrl-C end the command quietly while it imports (`release_import_guard` undoes).

    Does nothing outside the command, off the main thread, or where someone already set their
    own SIGINT handler.
    """
    if (
        launched_as_cli()
        and _main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, _exit_at_once)


def release_import_guard() -> None:
    """Give Ctrl-C back to Python's default (a `KeyboardInterrupt`) once imports are done."""
    if _main_thread() and signal.getsignal(signal.SIGINT) is _exit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Running:
    """What `while_running` learns of the run: whether the command ended it as stopped."""

    def __init__(self) -> None:
        self.stopped = False


@contextmanager
def while_running() -> Generator[Running]:
    """SIGTERM as a `Terminated`, and a calm second Ctrl-C, for the block.

    Only in the command's own process, on its main thread (`main` called from Python, as the
    tests do, changes no handler). Once interrupted (a Ctrl-C or SIGTERM this handler raised,
    or one the command reports as having stopped it, ``Running.stopped``), the calm handler
    stays for the rest of the process: its shutdown (stopping workers, Ray) must not end in a
    traceback either.
    """
    running = Running()
    if not (launched_as_cli() and _main_thread()):
        yield running
        return
    presses = 0

    def on_interrupt(signum: int, _frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses == 1 and not running.stopped:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if presses <= 2:
            _say("stopping (workers and files are being closed); interrupt again to quit at once")
            return
        _say("interrupted")
        os._exit(TERMINATED if signum == signal.SIGTERM else INTERRUPTED)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, on_interrupt)
    # For the rest of the process: the sharer thread may report a worker killed mid-handshake
    # after the pool is closed, even after `main` has returned.
    sys.excepthook = _quiet_sharer(sys.excepthook)
    try:
        yield running
    finally:
        if presses == 0 and not running.stopped:
            for s, handler in saved.items():
                signal.signal(s, handler)


def _quiet_sharer(hook: Callable[..., object]) -> Callable[..., object]:
    """``hook``, except for a connection dropped in multiprocessing's descriptor sharer.

    That thread (``resource_sharer``) hands file descriptors to worker processes and reports
    its errors through ``sys.excepthook``; a worker killed mid-handshake is one of them.
    """

    def quiet(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        sharer = threading.current_thread().name.endswith("(_serve)")
        if sharer and issubclass(kind, ConnectionError | EOFError):
            return
        hook(kind, value, tb)

    return quiet


guard_import()
