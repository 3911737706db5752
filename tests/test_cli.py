"""The command line as a user runs it: JSON output, determinism, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blazefl_fn.cli import main

QUICK = ["--clients", "6", "--clients-per-round", "3", "--rounds", "2"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blazefl_fn", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _json_run(*args: str) -> dict[str, Any]:
    done = _run("run", "--json", *QUICK, *args)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_json_output_has_the_documented_fields() -> None:
    done = _run("run", "--json", *QUICK)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout holds exactly one JSON object
    assert {"params_sha256", "rounds", "accuracy", "loss", "wall_seconds"} <= result.keys()
    assert len(result["params_sha256"]) == 64
    assert result["rounds"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["bytes_up"] == result["bytes_down"] > 0
    assert "round 1/2" in done.stderr
    assert "round 2/2" in done.stderr


def test_same_seed_same_digest_other_seed_other_digest() -> None:
    first = _json_run("--seed", "3")
    again = _json_run("--seed", "3")
    other = _json_run("--seed", "4")
    assert first["params_sha256"] == again["params_sha256"]
    assert first["params_sha256"] != other["params_sha256"]


def test_plain_output_shows_progress_and_final_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *QUICK]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("round 1/2  clients 3  train_loss ")
    assert "test_acc" in out[0]
    assert out[-1].startswith("final accuracy ")
    assert "params_sha256 " in out[-1]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("blazefl-fn")
    done = subprocess.run(
        [str(script), "run", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--clients-per-round" in done.stdout


def _write_bad_mnist(directory: Path) -> Path:
    directory.mkdir()
    for name in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        suffix = "idx3-ubyte" if "images" in name else "idx1-ubyte"
        (directory / f"{name}-{suffix}").write_bytes(b"\x08\x08\x08\x01junk")
    return directory


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        ([], 2, "the following arguments are required: command"),
        (["fly"], 2, "invalid choice: 'fly'"),
        (["run", "--clients", "-1"], 2, "clients must be an integer in [1, 10000000], got -1"),
        (["run", "--clients", "10", "--clients-per-round", "11"], 2, "exceeds clients (10)"),
        (["run", "--rounds", "-2"], 2, "rounds must be an integer in [0, 10000000], got -2"),
        (["run", "--rounds", "two"], 2, "invalid int value: 'two'"),
        (["run", "--local-epochs", "0"], 2, "local_epochs must be an integer in [1, 10000], got 0"),
        (["run", "--batch-size", "0"], 2, "batch_size must be an integer in [1, 10000000], got 0"),
        (["run", "--lr", "-0.1"], 2, "lr must be a finite number in (0, 10000], got -0.1"),
        (["run", "--lr", "nan"], 2, "lr must be a finite number in (0, 10000], got nan"),
        (["run", "--seed", "-5"], 2, "seed must be an integer in [0, 2**128 - 1], got -5"),
        (["run", "--threads", "0"], 2, "threads must be an integer in [1, 1024], got 0"),
        (
            ["run", "--synthetic-alpha", "-1"],
            2,
            "synthetic_alpha must be a finite number in [0, 1000]",
        ),
        (["run", "--alpha", "0"], 2, "alpha must be a finite number in (0, 1e+06], got 0.0"),
        (
            ["run", "--partition", "dirichlet"],
            2,
            "synthetic dataset is partitioned by its generator",
        ),
        (["run", "--partition", "zipf"], 2, "invalid choice: 'zipf'"),
        (
            ["run", "--shards-per-client", "0"],
            2,
            "shards_per_client must be an integer in [1, 10000000]",
        ),
        (["run", "--augment", "--dataset", "mnist", "--data-dir", "x"], 2, "augment (random crop"),
        (["run", "--dataset", "cifar10"], 2, "dataset 'cifar10' needs a data directory"),
        (["partition", "--data-dir", "/nonexistent/mnist"], 1, "MNIST directory not found"),
        (
            ["partition", "--data-dir", "x", "--clients", "0"],
            2,
            "clients must be an integer in [1, 10000000]",
        ),
        (["run", "--algorithm", "fedsgd"], 2, "invalid choice: 'fedsgd'"),
        (["run", "--dataset", "cifar7"], 2, "invalid choice: 'cifar7'"),
        (["run", "--executor", "dask"], 2, "invalid choice: 'dask'"),
        (["run", "--dataset", "mnist"], 2, "dataset 'mnist' needs a data directory"),
        (["run", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (
            ["run", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"],
            1,
            "MNIST directory not found: /nonexistent/mnist",
        ),
    ],
)
def test_bad_input_exits_with_one_line(
    argv: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == status
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("blazefl-fn: error: ")
    assert message in lines[0]
    assert captured.out == ""


def test_malformed_data_file_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _write_bad_mnist(tmp_path / "mnist")
    argv = ["run", "--dataset", "mnist", "--data-dir", str(directory), *QUICK]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "bad magic" in err
    assert "train-labels-idx1-ubyte" in err  # labels are read first: they bound the images


def test_errors_carry_no_traceback_in_a_real_process() -> None:
    done = _run("run", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "blazefl-fn: error: MNIST directory not found: /nonexistent/mnist"
