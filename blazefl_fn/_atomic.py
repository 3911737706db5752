"""Atomic file replacement: write a temporary file beside the target, fsync, rename.

Only regular files are ever replaced. An output path that names a device, a FIFO, a socket, a
directory or a symbolic link is refused in one line (`check_output`) before anything is
written: renaming a new file over it would replace the node or the link itself (``/dev/null``
became a regular file), never write where it points. Directories on the way may be links.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from collections.abc import Generator
from pathlib import Path

from ._owned_dirs import alive

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, in words (``"a regular file"``, ``"a FIFO"``, ...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "an unusual file"


def check_output(path: str | os.PathLike[str], what: str) -> None:
    """Refuse to write ``path`` unless it is missing or a regular file (not a link).

    Args:
        path: the file to be written.
        what: how the refusal names it, path included (``"metrics log runs/m.jsonl"``).

    Raises:
        ValueError: ``path`` is a symbolic link, a directory, a device, a FIFO or a socket
            (one line naming it and what it is).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ValueError(f"{what}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode):
        return
    hint = (
        "; give the path of the file it points to"
        if stat.S_ISLNK(mode)
        else "; blazefl-fn writes only regular files"
    )
    raise ValueError(f"{what} is {kind_of(mode)}, not a regular file{hint}")


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` left by writers that died (SIGKILL, power loss).

    Only names of exactly this module's pattern (``.STEM.tmp-PID-THREAD.SUFFIX``) whose PID is
    not a live process are removed, never anything else. Returns the removed paths.
    """
    pattern = re.compile(
        rf"\.{re.escape(path.stem)}\.tmp-(\d{{1,10}})(?:-\d{{1,20}})?{re.escape(path.suffix)}"
    )
    removed: list[Path] = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is None or int(match.group(1)) == os.getpid() or alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def replaced_atomically(path: Path, what: str = "output") -> Generator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over ``path``.

    The target is always either its old content or the complete new file. On any exception
    the temporary file is removed and the exception propagates. The temporary name keeps
    ``path``'s suffix, so writers that choose a format by suffix still work. Temporary files
    of ``path`` left by writers that were killed are removed first (`remove_stale_temps`).

    Raises:
        ValueError: ``path`` is not a regular file (`check_output`); nothing is written.
    """
    check_output(path, f"{what} {path}")
    remove_stale_temps(path)
    # Thread id too: two threads of one process never share a temporary file.
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename into ``directory`` durable (best effort: where a directory cannot be
    opened or fsynced, nothing happens)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
