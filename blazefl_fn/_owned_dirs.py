"""Temporary directories named after the process that owns them, removed once it is dead.

A process killed with SIGKILL runs no cleanup, so what it made in the temporary directory
stays: a client store's spill files, the ``pymp-*`` directories of killed worker processes.
Every such directory this library makes is called ``PREFIX<pid>-<start>-<random>``, where
``start`` is when the process started (Linux's ``/proc/<pid>/stat``, so that a reused pid
is not mistaken for the owner), and the next process that makes one of the same kind
removes those whose owner is gone (`remove_dead_owners`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

STORE_PREFIX = "blazefl-fn-store-"
POOL_PREFIX = "blazefl-fn-pool-"


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
    """When process ``pid`` started (clock ticks since boot), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _owner_alive(pid: int, start: int) -> bool:
    if not alive(pid):
        return False
    now = started(pid)
    # No /proc (not Linux): a live pid is taken as the owner, erring towards keeping files.
    return now is None or now == start


def owned_dir(prefix: str, parent: str | None = None) -> str:
    """A new private directory for this process under ``parent`` (default: the system's
    temporary directory), after removing those of the same kind whose owner died.
    """
    remove_dead_owners(prefix, parent)
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{prefix}{pid}-{started(pid) or 0}-", dir=parent)


def remove_dead_owners(prefix: str, parent: str | None = None) -> list[str]:
    """Remove the directories ``PREFIX<pid>-<start>-*`` under ``parent`` whose owner is dead.

    Only real directories of this user with exactly that name pattern are touched (never a
    symlink, never anything else). Returns the removed paths.
    """
    base = parent if parent is not None else tempfile.gettempdir()
    pattern = re.compile(rf"{re.escape(prefix)}(\d{{1,10}})-(\d{{1,20}})-[\w]+")
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        pid, start = int(match.group(1)), int(match.group(2))
        if pid == os.getpid() or _owner_alive(pid, start):
            continue
        path = os.path.join(base, name)
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                shutil.rmtree(path)
                removed.append(path)
    return removed
