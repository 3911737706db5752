"""Shared by the Ray tests: loopback-only settings, Ray's processes, a tiny federation."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every Ray node in the tests binds these loopback addresses (Ray turns 127.0.0.1 itself into
# the machine's network address; other 127.x addresses it keeps).
HEAD_IP = "127.0.0.2"
NODE_IP = "127.0.0.3"

_TESTS = Path(__file__).resolve().parent
# No usage reports, no token files: a private cluster on loopback inside one test run. Ray's
# workers import the functions the tests map by module name: they need tests/ on their path.
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(_TESTS), str(_TESTS.parent), os.environ.get("PYTHONPATH", "")) if p
    ),
}


def ray_pids() -> set[int]:
    """Processes of any Ray instance on this machine (GCS, raylets, workers, actors)."""
    out = subprocess.run(
        ["pgrep", "-f",
         "gcs_server|raylet|ray::|default_worker.py|ray/dashboard|log_monitor|_ray_watch"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return {int(pid) for pid in out.split()} - {os.getpid()}


def strays(before: set[int]) -> set[int]:
    """Ray processes that appeared since ``before = ray_pids()`` and do not descend from a Ray
    process in ``before``: what a driver started and left behind.

    A Ray instance that keeps running meanwhile (a test module's session, a cluster started by
    hand) may start workers of its own at any time; those descend from its raylet, which is in
    ``before``, and are not counted. A driver that has exited leaves its processes hanging off
    init (or a subreaper) instead.
    """
    return {pid for pid in ray_pids() - before if not before & _ancestors(pid)}


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its parents, up to (not including) init."""
    chain: set[int] = set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return chain


def describe(pids: set[int]) -> list[str]:
    """Each of ``pids`` with its command line, for a failure message."""
    out: list[str] = []
    for pid in sorted(pids):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            command, state, parent = "(gone)", "-", "-"
        out.append(f"{pid} (parent {parent}, {state}): {command[:200]}")
    return out


def wait_until_gone(pids: set[int], seconds: float = 20.0) -> set[int]:
    """Those of ``pids`` still alive (not zombies) after waiting up to ``seconds``."""
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p for p in alive if _running(p)}
    return alive


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def ray_env() -> Iterator[None]:
    """`ENV` in this process for the module (Ray reads it when it starts or connects)."""
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
