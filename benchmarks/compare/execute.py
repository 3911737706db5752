"""Run one case as a fresh subprocess and time it from the outside."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .spec import Case, RunnerResult

__all__ = ["RUNNER_MODULES", "Run", "run_case"]

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


def run_case(
    case: Case, python: Path, log: Path, timeout: float, extra_env: Mapping[str, str] | None = None
) -> Run:
    """Launch the case's runner with ``python`` (and ``extra_env`` set); stderr goes to ``log``."""
    command = [str(python), "-m", RUNNER_MODULES[case.framework], case.to_json()]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        launched = time.time()
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env={**runner_env(case.threads), **(extra_env or {})},
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
