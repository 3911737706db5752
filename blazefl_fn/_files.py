"""The files a run writes: replaced atomically, written by one process, owned while in use.

**Atomic replacement.** A file is written beside its target, fsynced and renamed over it, so
the target is always the old or the complete new file. Only regular files are ever replaced:
an output path that names a device, a FIFO, a socket, a directory or a symbolic link is
refused in one line (`check_output`) before anything is written (renaming over ``/dev/null``
would replace the node itself). Directories on the way may be links.

**One writer per output.** An OS-level lock (``flock``) is held on a file beside the output
(`holding`). A second process that asks for the same output is refused at once with the
holder's pid and command line (`blazefl_fn.errors.OutputLockedError`). The kernel drops the
lock when its holder exits, however it exits (SIGKILL included), so a lock is never stale; a
holder that lets go normally also removes the lock file. Within one thread the lock is
re-entrant: the command line and `blazefl_fn.run.simulate` may both take the lock of the same
checkpoint. On systems without ``fcntl`` (Windows) nothing is locked. A lock file is opened
without following a symbolic link and used only if it is a regular file with no other name.

**Owned directories.** A private directory this library makes for a process (`owned_dir`:
client-state spill files, a local Ray session) holds a file ``.owner`` on which the owning
process keeps an exclusive ``flock`` while it uses the directory; the next process that makes
a directory of the same kind removes those it can lock (`remove_dead_owners`): their owners
are gone, even if they were killed with SIGKILL. Whatever cannot be shown to be abandoned
(a directory used from another machine, an unreadable lock file) is kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Generator
from pathlib import Path

import attrs

from .errors import OutputLockedError

__all__ = [
    "check_output",
    "fsync_directory",
    "holding",
    "lock_path",
    "owned_dir",
    "remove_dead_owners",
    "replaced_atomically",
]


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
