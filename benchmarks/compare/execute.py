"""Run one case as a fresh subprocess and time it from the outside."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .spec import Case, RunnerResult

__all__ = ["RUNNER_MODULES", "Run", "imported_elsewhere", "library_env", "run_case"]

RUNNER_MODULES = {
    "bare": "benchmarks.compare.runners.bare",
    "blazefl_fn": "benchmarks.compare.runners.fn",
    "flower": "benchmarks.compare.runners.flower_peer",
    "blazefl": "benchmarks.compare.runners.blazefl_peer",
}
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    """One repetition of one case.

    Attributes:
        startup: seconds from launching the process to the start of the round loop.
        loop: the round loop, as the runner measured it.
        whole: seconds from launching the process until it exited.
        error: why the run failed (then the timings are 0 and ``result`` is None).
    """

    startup: float
    loop: float
    whole: float
    result: RunnerResult | None
    error: str | None = None


def runner_env(threads: int) -> dict[str, str]:
    """The environment of every runner: the same intra-op thread count everywhere."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=str(REPO_ROOT),
        TQDM_DISABLE="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
    )
    return env


def library_env(shim: Path | None) -> dict[str, str]:
    """What a blazefl_fn runner's environment adds to import the package linked in ``shim``.

    Every runner's ``PYTHONPATH`` is this repository (`runner_env`), and ``python -m`` puts
    the working directory (this repository) first, so without this a blazefl_fn runner imports
    the package beside the harness whatever the caller's ``PYTHONPATH`` says. ``shim`` is a
    folder holding only a ``blazefl_fn`` link to another tree's package; with it first on
    ``PYTHONPATH`` (and the runner started with ``-P``, see `run_case`), that package is
    imported and everything else still comes from this repository: an A/B of two library
    versions runs today's harness on both.
    """
    if shim is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join([str(shim), str(REPO_ROOT)])}


def imported_elsewhere(run: Run, library: Path) -> Run:
    """``run`` failed with an error if its runner did not import blazefl_fn from ``library``."""
    if run.result is None:
        return run
    found = run.result.notes.get("blazefl_fn")
    wanted = str((library / "blazefl_fn").resolve())
    if found == wanted:
        return run
    return dataclasses.replace(
        run, result=None, error=f"the runner imported blazefl_fn from {found}, not {wanted}"
    )


def run_case(
    case: Case,
    python: Path,
    log: Path,
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
    shim: Path | None = None,
) -> Run:
    """Launch the case's runner with ``python`` (and ``extra_env`` set); stderr goes to ``log``.

    With a ``shim`` (`library_env`), the runner imports the package linked there and starts
    with ``-P``, so that the working directory does not come before it.
    """
    isolated = ["-P"] if shim is not None else []
    command = [str(python), *isolated, "-m", RUNNER_MODULES[case.framework], case.to_json()]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        launched = time.time()
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env={**runner_env(case.threads), **(extra_env or {}), **library_env(shim)},
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Run(0.0, 0.0, 0.0, None, f"timed out after {timeout:.0f} s (log: {log})")
        whole = time.perf_counter() - start
    err_tail = f"exit status {done.returncode} (log: {log})"
    if done.returncode != 0:
        return Run(0.0, 0.0, 0.0, None, err_tail)
    try:
        result = RunnerResult.parse(done.stdout)
    except ValueError:
        return Run(0.0, 0.0, 0.0, None, f"no result line, {err_tail}")
    return Run(result.loop_start - launched, result.loop_seconds, whole, result)
