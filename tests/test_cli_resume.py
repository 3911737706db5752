"""End to end: kill a CLI run, resume it, and get the uninterrupted run's bits and log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _procs import alive, descendants

from blazefl_fn.cli._commands import main
from blazefl_fn.run.checkpoint import load_checkpoint
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.metrics_log import read_metrics
from blazefl_fn.run.simulate import simulate

ROUNDS = 30
FLAGS = ["--rounds", str(ROUNDS), "--local-epochs", "3", "--quiet", "--json"]
CONFIG = RunConfig(rounds=ROUNDS, local_epochs=3)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "run", *FLAGS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rounds(log: Path, proc: subprocess.Popen[str], rounds: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= rounds:
            return
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"{log} did not reach {rounds} rounds")


def _resume(tmp_path: Path, *extra: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "blazefl_fn", "run", *FLAGS, "--resume", str(tmp_path / "ck"),
         "--metrics", str(tmp_path / "m.jsonl"), *extra],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def uninterrupted() -> str:
    return simulate(CONFIG).params_sha256


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["sequential", "processes"])
def test_sigkill_then_resume_gives_the_uninterrupted_bits(
    tmp_path: Path, executor: str, uninterrupted: str
) -> None:
    log = tmp_path / "m.jsonl"
    proc = _start("--executor", executor, "--checkpoint-dir", str(tmp_path / "ck"),
                  "--checkpoint-every", "3", "--metrics", str(log))  # fmt: skip
    _wait_for_rounds(log, proc, 7)
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    saved = load_checkpoint(tmp_path / "ck").state.round
    assert 3 <= saved < ROUNDS
    # Orphaned workers notice their parent is gone and exit.
    deadline = time.monotonic() + 30
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in family if alive(p)], "worker processes outlived the killed run"

    result = _resume(tmp_path, "--executor", executor)
    assert result["params_sha256"] == uninterrupted
    assert result["rounds"] == ROUNDS
    assert [r["round"] for r in read_metrics(log)] == list(range(1, ROUNDS + 1))


@pytest.mark.slow
def test_ctrl_c_writes_a_final_checkpoint(tmp_path: Path, uninterrupted: str) -> None:
    log = tmp_path / "m.jsonl"
    # Checkpoints only every 1000 rounds: the one found afterwards is Ctrl-C's.
    proc = _start("--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1000",
                  "--metrics", str(log))  # fmt: skip
    _wait_for_rounds(log, proc, 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("blazefl-fn: interrupted; checkpoint of the last completed round saved in")
    )
    saved = load_checkpoint(tmp_path / "ck").state.round
    assert 4 <= saved < ROUNDS
    assert [r["round"] for r in read_metrics(log)][-1] >= saved
    result = _resume(tmp_path)
    assert result["params_sha256"] == uninterrupted
    assert [r["round"] for r in read_metrics(log)] == list(range(1, ROUNDS + 1))


def test_resume_refuses_other_settings_and_bad_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = str(tmp_path / "ck")
    assert main(["run", "--rounds", "2", "--quiet", "--checkpoint-dir", ck]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", ck, "--lr", "0.5", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "blazefl-fn: error: the checkpoint was written by a run with other settings: "
        "lr=0.01 (requested 0.5)\n"
    )
    # Settings that do not change the bits may differ; the stored ones fill the rest.
    assert main(["run", "--resume", ck, "--rounds", "3", "--executor", "threads", "--json",
                 "--quiet"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["rounds"] == 3
    assert main(["run", "--resume", str(tmp_path / "none"), "--quiet"]) == 1
    assert capsys.readouterr().err.startswith("blazefl-fn: error: no checkpoint at")
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["run", "--resume", ck, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is corrupt or truncated" in err
    assert len(err.splitlines()) == 1
    assert main(["run", "--checkpoint-every", "0"]) == 2
    assert "checkpoint-every must be an integer >= 1, got 0" in capsys.readouterr().err


def test_plot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    logs = []
    for lr in ("0.01", "0.05"):
        path = tmp_path / f"lr{lr}.jsonl"
        assert main(["run", "--rounds", "3", "--lr", lr, "--quiet", "--metrics", str(path)]) == 0
        logs.append(str(path))
    out = tmp_path / "curves.png"
    assert main(["plot", *logs, "-o", str(out), "--labels", "slow,fast"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "missing.jsonl"), "-o", str(out)]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["plot", "-o", str(out)]) == 2
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "lr0.01.jsonl", "lr0.05.jsonl"]


# -- signals: one line and the documented status, never a traceback --------------------------


def _default_sigint() -> None:
    # A suite started as a background job inherits SIGINT ignored; a user's shell does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path, uninterrupted: str) -> None:
    log = tmp_path / "m.jsonl"
    proc = _start("--executor", "processes", "--checkpoint-dir", str(tmp_path / "ck"),
                  "--checkpoint-every", "1000", "--metrics", str(log))  # fmt: skip
    _wait_for_rounds(log, proc, 4)
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # Before: killed by the signal (no checkpoint of the last round, no message).
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"blazefl-fn: terminated; checkpoint of the last completed round saved in "
        f"{tmp_path / 'ck'} (continue with --resume {tmp_path / 'ck'})"
    ]
    deadline = time.monotonic() + 10  # the resource tracker leaves when its pipe closes
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in family if alive(p)], "workers outlived the terminated run"
    assert _resume(tmp_path, "--executor", "processes")["params_sha256"] == uninterrupted


@pytest.mark.slow
def _wait_until_delivered(pid: int, sig: signal.Signals, seconds: float = 5.0) -> None:
    """Wait until ``sig`` is no longer pending for ``pid`` (its handler has been entered)."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        pending = [int(line.split()[1], 16) for line in status.splitlines()
                   if line.startswith(("SigPnd:", "ShdPnd:"))]  # fmt: skip
        if not any(mask & bit for mask in pending):
            return
        time.sleep(0.001)
    raise AssertionError(f"signal {sig.name} still pending for process {pid}")


def test_a_second_ctrl_c_waits_for_the_cleanup(tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "run", *FLAGS, "--executor", "processes",
         "--checkpoint-dir", str(tmp_path / "ck"), "--metrics", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    _wait_for_rounds(log, proc, 3)
    proc.send_signal(signal.SIGINT)
    # Two SIGINTs the process has not yet taken are one signal (a loaded machine may not run it
    # for milliseconds): the second is sent once the first was delivered, at once, to land in
    # the cleanup (stopping the workers, the final checkpoint), which takes only milliseconds.
    _wait_until_delivered(proc.pid, signal.SIGINT)
    time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("blazefl-fn: stopping (workers and files are being closed)")
    assert lines[-1].startswith("blazefl-fn: interrupted; checkpoint of the last completed round")
    # The final checkpoint was written whole: the last completed round, or the one before it
    # when the Ctrl-C came between a round's log line and its end.
    assert load_checkpoint(tmp_path / "ck").state.round >= 2


@pytest.mark.parametrize("command", ["module", "script"])
def test_ctrl_c_while_importing_torch_is_one_line(command: str) -> None:
    argv = (
        [sys.executable, "-m", "blazefl_fn"]
        if command == "module"
        else [str(Path(sys.executable).parent / "blazefl-fn")]
    )
    proc = subprocess.Popen(
        [*argv, "run", "--rounds", "100000", "--quiet"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    time.sleep(0.3)  # importing torch takes about a second here
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # Before: a KeyboardInterrupt traceback from inside torch's import.
    assert proc.returncode == 130, err
    assert err == "blazefl-fn: interrupted\n"


def test_json_and_the_metrics_log_carry_the_resolved_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: neither said which learning rate, model or executor produced the numbers.
    log, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    base = [
        "run",
        "--quiet",
        "--json",
        "--clients",
        "4",
        "--clients-per-round",
        "2",
        "--lr",
        "0.05",
    ]
    assert main([*base, "--rounds", "2", "--metrics", str(log), "--checkpoint-dir", str(ck)]) == 0
    fresh = json.loads(capsys.readouterr().out)["config"]
    assert main([*base, "--rounds", "3", "--metrics", str(log), "--resume", str(ck),
                 "--executor", "threads"]) == 0  # fmt: skip
    resumed = json.loads(capsys.readouterr().out)["config"]
    assert (fresh["lr"], fresh["executor"], fresh["rounds"]) == (0.05, "sequential", 2)
    assert (resumed["lr"], resumed["executor"], resumed["rounds"]) == (0.05, "threads", 3)
    records = read_metrics(log)
    assert [r.get("config") for r in records] == [fresh, None, resumed]
    assert RunConfig(**resumed) == RunConfig(
        clients=4, clients_per_round=2, lr=0.05, rounds=3, executor="threads"
    )
