"""The command line fails in one line with a distinct status, whatever goes wrong at run time.

Each test runs the real CLI in a subprocess, as a user would (issue: run errors printed ~60
lines of traceback; divergence exited 0; Ctrl-C during start-up claimed a checkpoint it had
not written; absurd flag values ran or failed with internal messages).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blazefl_fn import run as run_module
from blazefl_fn.cli import json_safe
from blazefl_fn.run import RunConfig, check_memory

# The default synthetic job, with a ReLU MLP and a learning rate that makes client 17's
# training blow up in round 1 (measured: the other sampled clients stay finite until round 2).
DIVERGING = ["--model", "mlp", "--lr", "1000", "--quiet"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blazefl_fn", *args],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("blazefl-fn: error: "), lines[0]
    return lines[0]


def test_divergence_exits_3_with_one_line_naming_client_and_round() -> None:
    done = _cli("run", *DIVERGING, "--rounds", "3", "--json")
    assert done.returncode == 3
    assert done.stdout == ""  # no result that looks like a success
    line = _one_error_line(done)
    assert "round 1: client 17 sent non-finite values (NaN or Inf" in line
    assert "--skip-nonfinite" in line


def test_skip_nonfinite_runs_on_and_counts_the_skipped_clients() -> None:
    done = _cli("run", *DIVERGING, "--rounds", "1", "--json", "--skip-nonfinite")
    assert done.returncode == 0, done.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in the JSON output")

    summary = json.loads(done.stdout, parse_constant=refuse)
    assert summary["skipped_clients"] == 1
    assert summary["rounds"] == 1


def test_debug_shows_the_traceback_and_still_ends_with_the_line() -> None:
    for given in (["--debug"], []):
        env = {} if given else {"BLAZEFL_FN_DEBUG": "1"}
        done = _cli("run", *DIVERGING, "--rounds", "1", *given, env=env)
        assert done.returncode == 3
        assert "Traceback (most recent call last)" in done.stderr
        assert "NonFiniteError" in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("blazefl-fn: error: round 1:")


def test_json_never_holds_bare_nan() -> None:
    assert json_safe({"a": [float("nan"), float("-inf"), 1.5], "b": (2,)}) == {
        "a": [None, None, 1.5],
        "b": [2],
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clients", "2147483648"], "clients must be an integer in [1, 10000000]"),
        (["--threads", "2147483648"], "threads must be an integer in [1, 1024]"),
        (["--lr", "1e37"], "lr must be a finite number in (0, 10000]"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**128 - 1]"),
        (["--model", "cnn"], "model 'cnn' needs image inputs"),
        (["--executor", "processes", "--workers", "1000"], "pass --oversubscribe"),
        (["--target-accuracy", "1.5"], "target_accuracy must be a finite number in (0, 1]"),
    ],
)
def test_out_of_range_flags_exit_2_at_parse_time(flags: list[str], message: str) -> None:
    start = time.monotonic()
    done = _cli("run", "--rounds", "1", *flags)
    assert done.returncode == 2
    assert message in _one_error_line(done)
    assert time.monotonic() - start < 60  # refused before any work, not after


def test_negative_zero_is_zero() -> None:
    # Before: -0 passed the ">= 0" check and numpy refused it later ("scale < 0", exit 1).
    assert RunConfig(synthetic_alpha=-0.0).synthetic_alpha == 0.0
    plus = _cli("run", "--rounds", "1", "--json", "--quiet", "--synthetic-alpha", "0")
    minus = _cli("run", "--rounds", "1", "--json", "--quiet", "--synthetic-alpha", "-0")
    assert plus.returncode == minus.returncode == 0, minus.stderr
    assert json.loads(plus.stdout)["params_sha256"] == json.loads(minus.stdout)["params_sha256"]


def test_too_many_synthetic_clients_are_refused_with_the_memory_they_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_module, "_available_memory", lambda: 2**30)
    check_memory(RunConfig(clients=1000))  # ~60 MB: fits
    with pytest.raises(ValueError, match=r"clients=100,000: .* about 5\.7 GiB .* 1\.0 GiB"):
        check_memory(RunConfig(clients=100_000, clients_per_round=10))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _wait_for(predicate: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["cli-only", "process-group"])
def test_ctrl_c_while_workers_start_says_nothing_was_saved(tmp_path: Path, group: bool) -> None:
    # Before (`timeout -s INT 8 blazefl-fn run --executor processes --checkpoint-dir ck`):
    # "checkpoint saved in ck" although ck did not exist, and the workers still starting
    # printed tracebacks. A terminal's Ctrl-C reaches the whole process group; `timeout`
    # signals the CLI alone.
    ck = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "run", "--executor", "processes", "--workers", "6",
         "--checkpoint-dir", str(ck), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: len(_children(proc.pid)) >= 2, 60)  # workers are being started
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        "blazefl-fn: interrupted; no round completed, so no checkpoint was saved"
    ]
    assert not (ck / "checkpoint.pt").exists()
    _wait_for(lambda: not _session_alive(proc.pid), 10)  # no worker outlives the CLI


def _session_alive(sid: int) -> bool:
    out = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True, check=False)
    return bool(out.stdout.split())


@pytest.mark.slow
def test_a_killed_worker_is_one_line_and_status_3() -> None:
    # Before: its message was good, but it came after a 31-line traceback.
    proc = subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "run", "--executor", "processes", "--workers", "2",
         "--rounds", "100000", "--clients-per-round", "30", "--clients", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first round ended: the workers are busy with clients
        workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        assert workers
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"worker process {workers[0]} was killed by SIGKILL" in lines[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
