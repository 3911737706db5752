"""The command line fails in one line with a distinct status, whatever goes wrong at run time.

Where the process is the point (signals, workers, what reaches the terminal) a test runs the
real CLI in a subprocess, as a user would; refusals of flags run in-process (issue: run errors
printed ~60 lines of traceback; divergence exited 0; Ctrl-C during start-up claimed a
checkpoint it had not written; absurd flag values ran or failed with internal messages).
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import pytest
from _cli import run_inline

from blazefl_fn.cli._commands import json_safe
from blazefl_fn.cli._flags import build_parser, flag_ranges
from blazefl_fn.run.config import RunConfig

# The default synthetic job, with a ReLU MLP and a learning rate that makes client 17's
# training blow up in round 1 (measured on streams version 2: the other sampled clients stay
# finite until round 2; lr 2500 keeps all of them finite in round 1).
DIVERGING = ["--model", "mlp", "--lr", "3000", "--quiet"]


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
        (
            ["--executor", "processes", "--client-timeout", "-1"],
            "client_timeout must be a finite number in (0, 1e+06], got -1.0",
        ),
    ],
)
def test_out_of_range_flags_exit_2_at_parse_time(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process (a real one: the test below).
    done = run_inline(capsys, "run", "--rounds", "1", *flags)
    assert done.returncode == 2
    assert message in _one_error_line(done)
    assert done.stdout == ""  # refused before any work: no round's progress line


def test_an_out_of_range_flag_is_one_line_from_a_real_process() -> None:
    done = _cli("run", "--rounds", "1", "--lr", "1e37")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "lr must be a finite number in (0, 10000]" in _one_error_line(done)


def test_negative_zero_is_zero(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: -0 passed the ">= 0" check and numpy refused it later ("scale < 0", exit 1).
    assert RunConfig(synthetic_alpha=-0.0).synthetic_alpha == 0.0
    quick = ("run", "--rounds", "1", "--json", "--quiet")
    plus = run_inline(capsys, *quick, "--synthetic-alpha", "0")
    minus = run_inline(capsys, *quick, "--synthetic-alpha", "-0")
    assert plus.returncode == minus.returncode == 0, minus.stderr
    assert json.loads(plus.stdout)["params_sha256"] == json.loads(minus.stdout)["params_sha256"]


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


def _signal_a_busy_worker(sig: signal.Signals, *extra: str) -> tuple[int, int, str, int]:
    """Run the CLI on processes, send ``sig`` to a worker once the first round ended; return
    (CLI pid, its exit status, its stderr, the worker's pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "run", "--executor", "processes", "--workers", "2",
         "--rounds", "100000", "--clients-per-round", "30", "--clients", "30", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first round ended: the workers are busy with clients
        workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        assert workers
        os.kill(workers[0], sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.pid, proc.returncode, stderr, workers[0]


@pytest.mark.slow
def test_a_killed_worker_is_one_line_and_status_3() -> None:
    # Before: its message was good, but it came after a 31-line traceback.
    _, status, stderr, worker = _signal_a_busy_worker(signal.SIGKILL)
    assert status == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"worker process {worker} was killed by SIGKILL" in lines[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_a_stopped_worker_fails_the_run_after_client_timeout() -> None:
    # Before: a worker stopped with SIGSTOP hung the round forever.
    pid, status, stderr, worker = _signal_a_busy_worker(signal.SIGSTOP, "--client-timeout", "2")
    assert status == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"worker process {worker} gave no result for client" in lines[0]
    assert "within client_timeout=2 s" in lines[0]
    _wait_for(lambda: not _session_alive(pid), 10)  # the stopped worker was killed too


def test_client_timeout_needs_the_processes_executor(capsys: pytest.CaptureFixture[str]) -> None:
    done = run_inline(capsys, "run", "--client-timeout", "5")
    assert done.returncode == 2
    assert "client_timeout applies to the processes and ray executors" in _one_error_line(done)


def _bounds(text: str) -> tuple[float, bool, float | None, bool]:
    """``(low, low_included, high, high_included)`` of a documented range."""
    text = text.removesuffix(", or unset")
    if text.startswith(">"):
        return float(text.split()[-1]), text.startswith(">="), None, False
    match = re.fullmatch(r"in ([\[(])(\S+), (.+)([\])])", text)
    assert match, text
    high = 2**128 - 1 if match[3] == "2**128 - 1" else float(match[3])
    return float(match[2]), match[1] == "[", high, match[4] == "]"


def _accepts(field: str, value: float) -> bool:
    kind = next(f for f in attrs.fields(RunConfig) if f.name == field).type
    typed = int(value) if "int" in str(kind) else float(value)
    try:
        attrs.validate(attrs.evolve(RunConfig(), **{field: typed}))
    except ValueError as exc:
        return f"{field} must be" not in str(exc)  # refused by another (cross-field) rule
    return True


@pytest.mark.parametrize(("flag", "accepted"), flag_ranges())
def test_every_documented_flag_range_is_the_range_enforced(flag: str, accepted: str) -> None:
    # The command-line page prints `flag_ranges()`; this checks each row against the validator.
    field = flag.removeprefix("--").replace("-", "_")
    build_parser().parse_args(["run", flag, "1"])  # a real flag (else UsageError)
    if field == "checkpoint_every":
        return  # checked by main(), covered by test_cli_resume
    low, low_in, high, high_in = _bounds(accepted)
    step = 1 if "integer" in _message(field) else 1e-9 * max(1.0, abs(low))
    assert _accepts(field, low) == low_in
    assert not _accepts(field, low - step)
    if high is not None:
        assert _accepts(field, high) == high_in
        assert not _accepts(field, high + max(step, abs(high) * 1e-9))


def _message(field: str) -> str:
    try:
        RunConfig(**{field: -(10**40)})  # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{field} accepted -1e40")


def test_every_numeric_config_field_has_a_documented_range() -> None:
    documented = {flag for flag, _ in flag_ranges()}
    for field in attrs.fields(RunConfig):
        if str(field.type).replace(" ", "") in ("int", "float", "int|None", "float|None"):
            assert f"--{field.name.replace('_', '-')}" in documented, field.name


def test_a_gzip_bomb_in_the_data_dir_is_one_line_and_status_1(tmp_path: Path) -> None:
    # Before: a 2 MB .gz was inflated to 2.3 GB (4.3 GB peak) before being refused.
    import gzip
    import struct

    def idx(path: Path, dims: tuple[int, ...], data: bytes) -> None:
        path.write_bytes(struct.pack(f">2xBB{len(dims)}I", 0x08, len(dims), *dims) + data)

    for prefix, n in (("train", 20), ("t10k", 10)):
        idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (n,), bytes(n))
        idx(tmp_path / f"{prefix}-images-idx3-ubyte", (n, 28, 28), bytes(n * 784))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2xBBIII", 0x08, 3, 20, 28, 28))
        for _ in range(64):
            f.write(bytes(1 << 20))  # 64 MiB behind a header that declares 15,680 bytes
    done = _cli("run", "--dataset", "mnist", "--data-dir", str(tmp_path), "--rounds", "1",
                "--clients", "2", "--clients-per-round", "2")  # fmt: skip
    assert done.returncode == 1
    assert "trailing bytes after the 15680 bytes of data the header declares" in _one_error_line(
        done
    )


def test_a_value_error_inside_the_round_loop_is_a_run_failure_not_a_file_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: any ValueError exited 1, which the docs define as a problem with a file.
    from blazefl_fn.cli import _commands as cli
    from blazefl_fn.run import simulate as run

    def failing_round(*_: object) -> object:
        def round_fn(*_: object) -> object:
            raise ValueError("an aggregation stage refused its input")

        return round_fn

    monkeypatch.setattr(run, "make_round", failing_round)
    assert cli.main(["run", "--rounds", "2", "--quiet"]) == 3
    assert capsys.readouterr().err == (
        "blazefl-fn: error: an aggregation stage refused its input\n"
    )

    def failing_data(*_: object) -> object:
        raise ValueError("data.bin: malformed")

    monkeypatch.setattr(run, "load_federation", failing_data)
    assert cli.main(["run", "--rounds", "2", "--quiet"]) == 1  # before the loop: a file's
    assert "data.bin: malformed" in capsys.readouterr().err


def test_a_malformed_metrics_log_on_resume_is_still_a_file_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blazefl_fn.cli import _commands as cli

    ck, log = str(tmp_path / "ck"), tmp_path / "m.jsonl"
    assert cli.main(["run", "--rounds", "1", "--quiet", "--checkpoint-dir", ck,
                     "--metrics", str(log)]) == 0  # fmt: skip
    log.write_text("not json\n")
    capsys.readouterr()
    assert cli.main(["run", "--rounds", "2", "--quiet", "--resume", ck, "--metrics", str(log)]) == 1
    assert "m.jsonl:1: not a JSON record" in capsys.readouterr().err


# -- small holes left by earlier hardening: each one line with the documented status ------------


@pytest.mark.slow
def test_a_client_timeout_that_kills_workers_mid_handshake_is_still_one_line() -> None:
    # Before: about half the runs added a ConnectionResetError traceback from multiprocessing's
    # descriptor-sharing thread (a worker killed while fetching a shared tensor).
    for _ in range(4):
        done = _cli("run", "--executor", "processes", "--client-timeout", "1e-9", "--rounds", "1")
        assert done.returncode == 3
        assert "within client_timeout=1e-09 s" in _one_error_line(done)


def test_a_noise_multiplier_the_accountant_cannot_take_is_a_bad_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: exit 1, "the rdp accountant cannot bound z=9.99989e-321 ...: float division by
    # zero", once the run had started.
    from blazefl_fn.cli._commands import main

    assert main(["run", "--dp", "central", "--dp-noise-multiplier", "1e-320"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "blazefl-fn: error: dp_noise_multiplier must be 0 (no noise) or a finite number in "
        "[0.001, 1e+06], got 1e-320"
    )


def test_a_prv_accounting_of_gigabytes_is_refused_at_parse_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: z = 0.03 over 100 rounds grew past 24 GB until the kernel killed the run.
    from blazefl_fn.cli._commands import main

    start = time.monotonic()
    argv = ["run", "--dp", "central", "--dp-accountant", "prv", "--dp-noise-multiplier", "0.03",
            "--rounds", "100"]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("blazefl-fn: error: the prv accountant would discretize 100 rounds")
    assert "use the rdp accountant" in line
    assert time.monotonic() - start < 10


def _idx(path: Path, dims: tuple[int, ...], data: bytes = b"") -> None:
    path.write_bytes(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data)


@pytest.mark.parametrize("empty", ["train", "t10k"])
def test_an_mnist_split_without_examples_is_a_file_error_naming_it(
    tmp_path: Path, empty: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: an empty test file exited 3 ("cannot evaluate on an empty dataset") and an empty
    # training file said "num_samples must be an integer >= 1", neither naming the file.
    from blazefl_fn.cli._commands import main

    for prefix in ("train", "t10k"):
        n = 0 if prefix == empty else 20
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte", (n, 28, 28), bytes(n * 28 * 28))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (n,), bytes(i % 10 for i in range(n)))
    argv = ["run", "--dataset", "mnist", "--data-dir", str(tmp_path), "--clients", "2",
            "--clients-per-round", "1", "--rounds", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    path = tmp_path / f"{empty}-labels-idx1-ubyte"
    assert line == f"blazefl-fn: error: {path}: holds no examples (0 labels)"


def test_portable_in_an_environment_at_the_kernels_limit_is_one_line() -> None:
    # Before: the restart with the pins failed with an OSError traceback (E2BIG).
    argv = [sys.executable, "-m", "blazefl_fn", "run", "--rounds", "1", "--portable", "--quiet"]

    def env_with(pad: int) -> dict[str, str]:
        pins = ("ATEN_", "MKL_", "ONEDNN_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(pins)}
        for i in range(pad // 100_000):
            env[f"PAD{i}"] = "x" * 100_000
        env["PAD_REST"] = "x" * (pad % 100_000 + 1)
        return env

    # /bin/true under a name as long as the interpreter's (the kernel counts the file name):
    # the same argv and environment, but only the exec itself is tried.
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        room = len(sys.executable) - len(scratch) - 1
        if room < 1:
            pytest.skip("the interpreter's path is too short to mirror")
        probe = Path(scratch, "t" * room)
        probe.symlink_to("/bin/true")

        def starts(pad: int) -> bool:
            try:
                subprocess.run(argv, executable=probe, env=env_with(pad), check=True)
            except OSError:
                return False
            return True

        low, high = 0, 4 * 1024 * 1024
        assert starts(low)
        assert not starts(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if starts(middle) else (low, middle)
    # The command itself starts at `low`; its restart adds the pins, which no longer fit.
    done = subprocess.run(
        argv, env=env_with(low), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    line = _one_error_line(done)
    assert "--portable restarts the command with its pins in the environment" in line
    assert "Argument list too long" in line
