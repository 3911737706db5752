"""One writer per output: an OS-level lock (``flock``) held on a file beside the output.

A second process that asks for the same output is refused at once with the holder's pid and
command line. The kernel drops the lock when its holder exits, however it exits (SIGKILL
included), so a lock is never stale. Within one process the lock is re-entrant: the command
line and `blazefl_fn.run.simulate` may both take the lock on the same checkpoint directory.
On systems without ``fcntl`` (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Generator
from pathlib import Path

__all__ = ["OutputLockedError", "holding", "lock_path"]


class OutputLockedError(OSError):
    """Another process is writing the same checkpoint directory or metrics file."""


_held: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, holds)
_guard = threading.Lock()


def lock_path(output: Path, *, directory: bool) -> Path:
    """The lock file of ``output``: ``.blazefl_fn.lock`` inside a directory, ``.NAME.lock``
    beside a file."""
    if directory:
        return output / ".blazefl_fn.lock"
    return output.parent / f".{output.name}.lock"


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _acquire(lock: Path, what: str) -> int:
    import fcntl  # POSIX only; the caller skips locking without it

    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputLockedError(
            f"{what} is in use by {_holder(lock)} (lock {lock}); wait for that run to end or "
            "choose another path"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    command = " ".join(sys.argv)[:300]
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} ({command})\n".encode("utf-8", errors="replace"))
    return fd


@contextlib.contextmanager
def holding(output: str | os.PathLike[str], what: str, *, directory: bool) -> Generator[None]:
    """Hold the lock of ``output`` (a checkpoint directory or file, a metrics file) meanwhile.

    Args:
        output: the path written under the lock.
        what: how the refusal names it, e.g. ``"checkpoint directory ck"``.
        directory: ``output`` is a directory (created if missing) rather than a file.

    Raises:
        OutputLockedError: another process holds it (the message names that process).
    """
    if sys.platform == "win32":  # pragma: no cover - no flock
        yield
        return
    lock = lock_path(Path(output), directory=directory).absolute()
    with _guard:
        fd, holds = _held.get(lock, (-1, 0))
        if holds == 0:
            fd = _acquire(lock, what)
        _held[lock] = (fd, holds + 1)
    try:
        yield
    finally:
        with _guard:
            fd, holds = _held[lock]
            if holds == 1:
                del _held[lock]
                # Closing the last descriptor releases the flock; the file stays (removing it
                # would race with a process that has just opened it).
                os.close(fd)
            else:
                _held[lock] = (fd, holds - 1)
