"""Where a sweep's cell runs: a process of this machine, or a task on a Ray cluster
(``sweep --ray-address``). Either way the cell is the same ``python -m blazefl_fn run`` command
writing under ``--out``, so the two give the same files and the same bits.

A Ray task runs the command as a child of its Ray worker, in the sweep's working directory, and
needs ``--out`` (and any relative path a cell names) on a filesystem every node shares.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..executors.ray_pool import join_ray_cluster

# How long a stopped cell may take to write its final checkpoint before it is killed.
STOP_GRACE = 60.0
STDOUT = ".stdout"
STDERR = "stderr.log"
# How often a Ray task looks for a cancellation while its cell runs.
_TASK_POLL = 0.2


# Starts a cell: it takes SIGINT and SIGTERM as a command does (a Ray worker starts its
# children with them blocked, and a blocked or ignored signal stays so across exec); on Linux it
# asks for SIGTERM when its parent dies (a sweep killed outright, a Ray worker killed), so that
# it writes its final checkpoint as a stopped run does; then it becomes the command. A
# ``preexec_fn`` could do the same, but is unsafe in a process with threads, as a Ray worker is.
_LAUNCH = """
import os, signal, sys
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, signal.SIG_DFL)
if hasattr(signal, "pthread_sigmask"):  # POSIX only
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    if os.getppid() != int(sys.argv[1]):
        os._exit(143)  # the parent died before that: nobody waits for this cell
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _popen(
    argv: Sequence[str], directory: Path, cwd: str | None = None, *, own_group: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``python argv`` with its output in ``directory`` (``.stdout``; messages appended to
    ``stderr.log``, every attempt's), in a process group of its own if ``own_group``."""
    command = [sys.executable, "-c", _LAUNCH, str(os.getpid()), *argv]
    with open(directory / STDOUT, "wb") as stdout, open(directory / STDERR, "ab") as stderr:
        return subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=own_group,
        )


def _wait_or_kill(process: subprocess.Popen[bytes], seconds: float) -> None:
    """Wait up to ``seconds`` for ``process`` to end, then kill it."""
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalCell:
    """A cell's run as a child process of the sweep."""

    def __init__(self, argv: Sequence[str], directory: Path) -> None:
        self._process = _popen(argv, directory)

    def poll(self) -> tuple[int, str] | None:
        """``(exit status, "")`` once the run ended, else None."""
        status = self._process.poll()
        return None if status is None else (status, "")

    def stop(self, signum: int) -> None:
        """Send ``signum`` (the run then writes its final checkpoint)."""
        with contextlib.suppress(OSError):
            self._process.send_signal(signum)

    def wait_stopped(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic) for the run to end, then kill it."""
        _wait_or_kill(self._process, max(0.0, deadline - time.monotonic()))


def run_cell_task(argv: list[str], cwd: str, directory: str) -> int:
    """A Ray task's body: run a cell's command on this node and return its exit status.

    A cancellation (``ray.cancel``, a ``KeyboardInterrupt`` here) stops the command as Ctrl-C
    stops a run, so that it writes its final checkpoint, before the task ends.

    Raises:
        FileNotFoundError: ``directory`` or ``cwd`` is not on this node's filesystem.
    """
    where = Path(directory)
    if not where.is_dir() or not Path(cwd).is_dir():
        raise FileNotFoundError(
            f"{directory} is not visible on node {socket.gethostname()}: a Ray sweep needs "
            "--out and its working directory on a filesystem every node shares"
        )
    # A session of its own: a signal to the Ray worker's process group does not reach the cell;
    # it is stopped through this task only, as Ctrl-C stops a run.
    process = _popen(argv, where, cwd, own_group=True)
    try:
        while True:
            try:
                return process.wait(_TASK_POLL)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        with contextlib.suppress(OSError):
            process.send_signal(signal.SIGINT)
        _wait_or_kill(process, STOP_GRACE)
        raise


class Cluster:
    """A Ray cluster this process joined as a driver, and the task that runs a cell there."""

    def __init__(self, ray: Any) -> None:
        self.ray = ray
        # A failed attempt is the cell's failure, reported; running the sweep again resumes it.
        self.task: Any = ray.remote(max_retries=0)(run_cell_task)

    @classmethod
    def join(cls, address: str, node_ip: str | None) -> Cluster:
        """Join the cluster at ``address`` (see `join_ray_cluster`).

        Raises:
            ImportError: Ray is not installed.
            ConnectionError: nothing answers at ``address``.
        """
        return cls(join_ray_cluster(address, node_ip))

    def widest_node(self) -> float:
        """The CPUs of the cluster's largest live node."""
        nodes = self.ray.nodes()
        return max((float(n["Resources"].get("CPU", 0)) for n in nodes if n["Alive"]), default=0)

    def leave(self) -> None:
        """Disconnect this driver; the cluster runs on."""
        self.ray.shutdown()


class RayCell:
    """A cell's run as a Ray task on a cluster this process has joined."""

    def __init__(self, cluster: Cluster, argv: Sequence[str], directory: Path, cpus: int) -> None:
        self._ray = cluster.ray
        self._ref = cluster.task.options(num_cpus=cpus).remote(
            list(argv), str(Path.cwd()), str(directory.resolve())
        )

    def poll(self) -> tuple[int, str] | None:
        """``(exit status, "")`` once the task ended, ``(1, why)`` when it failed, else None."""
        ready, _ = self._ray.wait([self._ref], timeout=0)
        if not ready:
            return None
        try:
            return int(self._ray.get(self._ref)), ""
        except Exception as exc:  # a Ray error: the task's own, a node's death, a cancellation
            return 1, _ray_failure(exc)

    def stop(self, signum: int) -> None:
        """Cancel the task: its cell gets SIGINT and writes its final checkpoint."""
        del signum  # a cancellation raises KeyboardInterrupt in the task
        with contextlib.suppress(Exception):
            self._ray.cancel(self._ref)

    def wait_stopped(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic) for the task to end, then kill its worker (the
        cell ends with it and resumes from its last periodic checkpoint)."""
        ready, _ = self._ray.wait([self._ref], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            with contextlib.suppress(Exception):
                self._ray.cancel(self._ref, force=True)


def _ray_failure(exc: BaseException) -> str:
    """The last line of a Ray error's message (its cause, without Ray's traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
