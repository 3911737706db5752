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


def describe(pids: set[int]) -> list[str]:
    """Each of ``pids`` with its command line, for a failure message."""
    out: list[str] = []
    for pid in sorted(pids):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            command = "(gone)"
        out.append(f"{pid}: {command[:200]}")
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
