"""Private directories whose owner holds a lock on them, removed once no process holds it.

A process killed with SIGKILL runs no cleanup, so a client store's spill directory would stay
for ever. Each directory this library makes for a process (`owned_dir`) holds a file
``.owner`` on which the owning process keeps an exclusive ``flock`` for as long as it uses the
directory. The kernel drops the lock when the process exits, however it exits, so the next
process that makes a directory of the same kind removes those it can lock
(`remove_dead_owners`): their owners are gone. A directory in use by a process on another
machine or in another container sharing the parent directory stays locked (``flock`` over
NFS is forwarded to the server by Linux), and so does one whose lock file cannot be read:
whatever cannot be shown to be abandoned is kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import attrs

STORE_PREFIX = "blazefl-fn-store-"
_OWNER = ".owner"


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None where unknown, or once it
    has exited (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


@attrs.define
class OwnedDir:
    """A directory of this process's and the descriptor that holds its owner lock."""

    path: str
    lock_fd: int

    def remove(self) -> None:
        """Remove the directory, then let the lock go (idempotent; errors are ignored)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = -1


def owned_dir(prefix: str, parent: str | None = None) -> OwnedDir:
    """A new private directory ``PREFIX<pid>-<random>`` under ``parent`` (default: the
    system's temporary directory), locked by this process, after removing abandoned ones of
    the same kind.

    Raises:
        OSError: the directory or its lock file could not be made.
    """
    import fcntl  # POSIX; this library's spill directories are made on POSIX only

    remove_dead_owners(prefix, parent)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        # Locked under another name, then renamed: a directory whose ``.owner`` another
        # process can see is already locked (the lock belongs to the file, not its name).
        making = os.path.join(path, _OWNER + ".new")
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, os.path.join(path, _OWNER))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return OwnedDir(path, fd)


def remove_dead_owners(prefix: str, parent: str | None = None) -> list[str]:
    """Remove the directories ``PREFIX<pid>-*`` under ``parent`` that no process holds.

    Only real directories of this user with exactly that name pattern and an ``.owner`` file
    that can be locked are touched (never a symlink, never anything else). Returns the removed
    paths.
    """
    import fcntl

    base = parent if parent is not None else tempfile.gettempdir()
    pattern = re.compile(rf"{re.escape(prefix)}\d{{1,10}}-\w+")
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        if pattern.fullmatch(name) is None:
            continue
        path = os.path.join(base, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(path, _OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # no lock file (still being made, or not ours): keep it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner holds it
        try:
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
