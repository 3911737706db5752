"""Atomic file replacement: write a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Generator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over ``path``.

    The target is always either its old content or the complete new file. On any exception
    the temporary file is removed and the exception propagates. The temporary name keeps
    ``path``'s suffix, so writers that choose a format by suffix still work.
    """
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
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
