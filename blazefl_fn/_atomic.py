"""Atomic file replacement: write a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Generator
from pathlib import Path

from ._owned_dirs import alive


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
def replaced_atomically(path: Path) -> Generator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over ``path``.

    The target is always either its old content or the complete new file. On any exception
    the temporary file is removed and the exception propagates. The temporary name keeps
    ``path``'s suffix, so writers that choose a format by suffix still work. Temporary files
    of ``path`` left by writers that were killed are removed first (`remove_stale_temps`).
    """
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
    # Persist the rename itself.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
