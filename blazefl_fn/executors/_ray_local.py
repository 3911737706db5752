"""A Ray instance seen from its driver: joining one that answers, keeping the driver's signal
handlers, and a local instance that dies with its driver (`_ray_watch`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from .._files import started

# How long joining a cluster may wait for its address to answer at all.
_CONNECT_SECONDS = 5.0


def probe(address: str) -> None:
    """Refuse, within seconds, to join a cluster whose address nothing answers at.

    ``ray.init`` itself waits for a GCS for a minute or more.

    Raises:
        ConnectionError: no TCP connection to ``address`` (a ``HOST:PORT``; ``auto`` and
            ``ray://`` addresses are left to Ray, which answers those at once).
    """
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_SECONDS).close()
    except OSError as exc:
        reason = (
            f"no answer within {_CONNECT_SECONDS:g} s"
            if isinstance(exc, TimeoutError)
            else (exc.strerror or str(exc)).lower()
        )
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({reason}); start one there "
            "(ray start --head) or pass its address"
        ) from None


@contextlib.contextmanager
def signals_kept() -> Generator[None]:
    """Keep this process's own SIGINT and SIGTERM handlers across ``ray.init``.

    Ray installs its own SIGTERM handling (a six-line stack dump, then exit 1); the command
    line handles SIGTERM as Ctrl-C, with the final checkpoint, so its handlers are put back.
    Python's defaults are not: there Ray's handling stays as Ray sets it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            # Only handlers of this program's own (the command line's): a library user with
            # the default SIGTERM keeps Ray's, which shuts Ray down on the way out.
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(s, handler)


def ray_processes(package: str, session: str | None = None) -> list[tuple[int, int]]:
    """The Ray processes below this one, ``(pid, start)`` each: those running Ray's own files
    (under ``package``, Ray's directory) or named ``ray::...`` (its workers and agents), and
    any process whose command line names ``session``, the instance's session directory
    (a GCS server that has already left this process's tree is still this instance's)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    marker = os.path.join(package, "").encode()
    # A directory name of its own: /tmp/ray/session_<date>_<pid>, then a separator.
    named = [os.path.join(session, "").encode(), session.encode() + b"\0"] if session else []
    below: set[int] = set()
    todo = [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            below.add(pid)
    found: list[tuple[int, int]] = []
    for pid in sorted(below | ({p for ps in children.values() for p in ps} if named else set())):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ours = pid in below and (command.startswith(b"ray::") or marker in command)
        start = started(pid)
        if start is not None and pid != os.getpid() and (ours or any(n in command for n in named)):
            found.append((pid, start))
    return found


def reap(processes: list[tuple[int, int]], grace: float = 2.0) -> None:
    """Kill what is left of ``processes`` (``(pid, start)`` pairs) after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    left = processes
    while left:
        left = [(pid, start) for pid, start in left if started(pid) == start]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def session_dir(ray: Any) -> str | None:
    """The session directory of the Ray instance this driver started (None if Ray does not
    say: a private attribute, read defensively)."""
    with contextlib.suppress(Exception):
        path = ray._private.worker._global_node.get_session_dir_path()
        return str(path) if path else None
    return None


def watch_local_instance(
    package: str, session: str | None = None
) -> subprocess.Popen[bytes] | None:
    """Start `_ray_watch` over the local Ray instance's processes (None where there is no
    ``/proc`` to find them)."""
    me = started(os.getpid())
    processes = ray_processes(package, session)
    if me is None or not processes:
        return None
    script = os.path.join(os.path.dirname(__file__), "_ray_watch.py")
    return subprocess.Popen(
        [sys.executable, script, str(os.getpid()), str(me), *(f"{p}:{s}" for p, s in processes)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_watch(watch: subprocess.Popen[bytes]) -> None:
    """Have a watcher kill what is left of its instance, and wait for it (the instance was
    shut down, or the executor collected without ``close``)."""
    with contextlib.suppress(OSError):
        watch.terminate()
    try:
        watch.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watch.kill()
        watch.wait()
