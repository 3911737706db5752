"""The command line as a user runs it: JSON output, determinism, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import run_cli
from _memory import traced_peak

from blazefl_fn.cli._commands import main
from blazefl_fn.data import SyntheticClients, synthetic
from blazefl_fn.keys import Key
from blazefl_fn.run import _build as run_build
from blazefl_fn.run._build import evaluation_clients
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import SYNTHETIC_EAGER_CLIENTS, load_federation

QUICK = ["--clients", "6", "--clients-per-round", "3", "--rounds", "2"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


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


def test_synthetic_runs_are_eager_up_to_10000_clients_and_lazy_above(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = Key.from_seed(3)
    # Up to 10,000 clients a run's data is what it always was, train and test.
    data = load_federation(RunConfig(clients=30), key)
    plain = synthetic(1.0, 1.0, 30, key)
    assert isinstance(data.clients, tuple)
    assert torch.equal(data.clients[0].base.x, plain.clients[0].base.x)
    assert torch.equal(data.clients[0].base.y, plain.clients[0].base.y)
    for ours, theirs in zip(data.clients, plain.clients, strict=True):
        assert torch.equal(ours.indices, theirs.indices)
    assert torch.equal(data.test.x, plain.test.x)
    assert torch.equal(data.test.y, plain.test.y)
    # The switch, without generating 10,000 clients: what the builder asks `synthetic` for.
    calls: list[tuple[int, dict[str, Any]]] = []

    def recording(alpha: float, beta: float, num_clients: int, key: Key, **kwargs: Any) -> None:
        calls.append((num_clients, kwargs))

    monkeypatch.setattr(run_build, "synthetic", recording)
    for clients in (10_000, 10_001, 1_000_000):
        load_federation(RunConfig(clients=clients, clients_per_round=10), key)
    assert calls == [
        (10_000, {"lazy": False, "test_clients": 10_000}),
        (10_001, {"lazy": True, "test_clients": 10_000}),
        (1_000_000, {"lazy": True, "test_clients": 10_000}),
    ]
    assert SYNTHETIC_EAGER_CLIENTS == 10_000


def test_eval_clients_of_a_lazy_federation_are_its_test_clients() -> None:
    key = Key.from_seed(0)
    lazy = synthetic(1.0, 1.0, 20_000, key, lazy=True, test_clients=1)
    evaluated = evaluation_clients(lazy)
    assert isinstance(evaluated, SyntheticClients)
    assert evaluated == synthetic(1.0, 1.0, 10_000, key, lazy=True, test_clients=1).clients
    eager = synthetic(1.0, 1.0, 5, key)
    assert evaluation_clients(eager) is eager.clients


@pytest.mark.slow
def test_a_million_synthetic_clients_run_from_the_cli_in_little_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Refused before (about 57 GiB of data made up front); now lazy: a round generates the
    # clients it samples, and building costs the 10,000 test clients, as a 10,000-client run.
    flags = ["run", "--json", "--quiet", "--clients", "1000000", "--clients-per-round", "10"]
    start = time.perf_counter()
    with traced_peak() as peak:
        assert main([*flags, "--rounds", "1"]) == 0
    seconds = time.perf_counter() - start
    result = json.loads(capsys.readouterr().out)
    assert result["rounds"] == 1
    assert len(result["params_sha256"]) == 64
    assert seconds < 120, seconds
    # The test set (10,000 clients' held-out rows, about 110 MiB) and its making dominate.
    assert peak.bytes < 600 * 2**20, peak.bytes
