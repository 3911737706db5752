"""One writer per output: an OS-level lock (``flock``) held on a file beside the output.

A second process that asks for the same output is refused at once with the holder's pid and
command line. The kernel drops the lock when its holder exits, however it exits (SIGKILL
included), so a lock is never stale; a holder that lets go normally also removes the lock
file. Within one thread the lock is re-entrant: the command line and
`blazefl_fn.run.simulate` may both take the lock of the same checkpoint. On systems without
``fcntl`` (Windows) nothing is locked.

The output itself must be missing or a regular file (`blazefl_fn._atomic.check_output`), and a
lock file is opened without following a symbolic link and used only if it is a regular file
with no other name: a link or hard link planted at ``.NAME.lock`` would otherwise have the
run truncate and overwrite whatever it points at.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import threading
from collections.abc import Generator
from pathlib import Path

import attrs

from ._atomic import check_output, kind_of

__all__ = ["OutputLockedError", "holding", "lock_path"]


class OutputLockedError(OSError):
    """Another process or thread is writing the same checkpoint or metrics log."""


@attrs.define
class _Hold:
    fd: int
    owner: int  # the thread holding it
    count: int


_held: dict[Path, _Hold] = {}  # lock file -> its hold in this process
_guard = threading.Lock()


def lock_path(output: Path) -> Path:
    """The lock file of the file ``output``: ``.NAME.lock`` beside it."""
    return output.parent / f".{output.name}.lock"


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _acquire(lock: Path, what: str) -> int:
    import fcntl  # POSIX only; `holding` skips locking on Windows

    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"{what} is in use by {_holder(lock)} (lock {lock}); wait for that run to end "
                "or choose another path"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us removes the file as it lets go; if we locked a file that is
        # no longer the one at ``lock``, a third process may lock the new one: start again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        command = " ".join(sys.argv)[:300]
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({command})\n".encode("utf-8", errors="replace"))
    except BaseException:
        os.close(fd)  # releases the lock: nothing half-held survives a failed write
        raise
    return fd


def _open_lock(lock: Path) -> int:
    """The lock file, opened for writing only if it is a regular file of its own."""
    # O_NONBLOCK: a FIFO planted there must not block the open; it is refused just below.
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(
                f"lock file {lock} is a symbolic link, not one blazefl-fn made; remove it"
            ) from None
        raise
    info = os.fstat(fd)
    # Zero links: its holder removed it as it let go (`_acquire` then opens the new one).
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = kind_of(info.st_mode) if not stat.S_ISREG(info.st_mode) else "a hard link"
        raise ValueError(f"lock file {lock} is {what}, not one blazefl-fn made; remove it")
    return fd


@contextlib.contextmanager
def holding(output: str | os.PathLike[str], what: str) -> Generator[None]:
    """Hold the lock of the file ``output`` (a checkpoint, a metrics log) meanwhile.

    Re-entrant within one thread; another thread of this process is refused like another
    process, since two writers in one process would race just the same.

    Args:
        output: the file written under the lock (its directory is created if missing).
        what: how the refusal names it, e.g. ``"checkpoint ck"``.

    Raises:
        OutputLockedError: another process or thread holds it (the message names which).
        ValueError: ``output`` or its lock file is not a regular file (a device, a FIFO, a
            link, ...): nothing is created, truncated or written.
    """
    check_output(output, what)
    if sys.platform == "win32":  # pragma: no cover - no flock
        yield
        return
    lock = lock_path(Path(output).resolve())
    me = threading.get_ident()
    with _guard:
        hold = _held.get(lock)
        if hold is None:
            _held[lock] = _Hold(_acquire(lock, what), me, 1)
        elif hold.owner != me:
            raise OutputLockedError(
                f"{what} is in use by another thread of this process (pid {os.getpid()})"
            )
        else:
            hold.count += 1
    try:
        yield
    finally:
        with _guard:
            hold = _held[lock]
            hold.count -= 1
            if hold.count == 0:
                del _held[lock]
                # Removed while still locked, then released: a process that opened the old
                # file meanwhile sees it is gone (`_acquire`) and retries on a fresh one.
                with contextlib.suppress(OSError):
                    lock.unlink()
                os.close(hold.fd)
