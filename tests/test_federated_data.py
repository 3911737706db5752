"""Federated data through the run: views not copies, data sent once per pool, CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from _cli import run_inline
from _paths import mnist_dir, mnist_search_path
from _rng import global_rng_untouched
from test_data_cifar import cifar10_binary

from blazefl_fn.algorithms.fedavg import fedavg
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.executors import Processes
from blazefl_fn.keys import Key
from blazefl_fn.round import make_round
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import (
    load_federation,
    model_factory,
    run_rounds,
    simulate,
    train_transform,
)

MNIST = mnist_dir()
needs_mnist = pytest.mark.skipif(
    MNIST is None, reason=f"MNIST not found at {mnist_search_path()}; set BLAZEFL_FN_MNIST_DIR"
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blazefl_fn", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@needs_mnist
def test_mnist_clients_are_views_onto_one_base_tensor() -> None:
    config = RunConfig(
        dataset="mnist", data_dir=str(MNIST), clients=100, partition="dirichlet", alpha=0.1
    )
    data = load_federation(config, Key.from_seed(0).fold_in("data"))
    base = data.clients[0].base
    assert all(c.base is base for c in data.clients)
    pointer = data.clients[0].indices.untyped_storage().data_ptr()
    assert all(c.indices.untyped_storage().data_ptr() == pointer for c in data.clients)
    assert sum(len(c) for c in data.clients) == len(base) == 60_000


def test_processes_receive_the_dataset_once_per_pool_not_per_round() -> None:
    config = RunConfig(clients=8, clients_per_round=4, rounds=4)
    run_key = Key.from_seed(0)
    data = load_federation(config, run_key.fold_in("data"))
    algorithm = fedavg(
        model_factory(config, data), num_clients=8, clients_per_round=4, local=LocalSGD()
    )
    with Processes(2) as executor:
        round_fn = make_round(algorithm, data.clients, executor)
        assert executor.context_sends == 2  # sent by make_round, before the first round
        _state, reports = run_rounds(round_fn, algorithm.init(run_key), run_key, until=4)
        assert len(reports) == 4
        assert executor.context_sends == 2  # one per worker, for all 4 rounds


@pytest.mark.slow
@needs_mnist
def test_mnist_dirichlet_100_clients_one_digest_on_every_executor(processes2: Processes) -> None:
    flags = [
        "run", "--json", "--dataset", "mnist", "--data-dir", str(MNIST), "--clients", "100",
        "--clients-per-round", "10", "--partition", "dirichlet", "--alpha", "0.1",
        "--rounds", "2", "--batch-size", "50", "--lr", "0.1",
    ]  # fmt: skip
    done = _cli(*flags, "--executor", "sequential")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["partition"] == "dirichlet"
    digests = {"sequential (CLI)": result["params_sha256"]}
    config = RunConfig(
        dataset="mnist", data_dir=str(MNIST), clients=100, clients_per_round=10,
        partition="dirichlet", alpha=0.1, rounds=2, batch_size=50, lr=0.1, workers=2,
    )  # fmt: skip
    digests["threads"] = simulate(attrs.evolve(config, executor="threads")).params_sha256
    processes = attrs.evolve(config, executor="processes")
    digests["processes"] = simulate(processes, executor=processes2).params_sha256
    assert len(set(digests.values())) == 1, digests


@needs_mnist
def test_partition_command_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["partition", "--data-dir", str(MNIST), "--clients", "100", "--partition", "dirichlet",
             "--alpha", "0.1"]  # fmt: skip
    table = run_inline(capsys, *flags)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["client", "size", "c0"]
    as_json = run_inline(capsys, *flags, "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert len(report["sizes"]) == 100
    assert sum(report["sizes"]) == 60_000
    assert [sum(row) for row in report["counts"]] == report["sizes"]


def test_cifar_shards_with_augmentation_give_one_digest_on_every_executor(
    tmp_path: Path, processes2: Processes
) -> None:
    directory = cifar10_binary(tmp_path / "cifar", n=40, n_test=10)
    base = RunConfig(
        dataset="cifar10",
        data_dir=str(directory),
        clients=10,
        clients_per_round=4,
        rounds=2,
        batch_size=8,
        partition="shards",
        shards_per_client=2,
        augment=True,
    )
    digests = {
        name: simulate(
            attrs.evolve(base, executor=name, workers=2),
            executor=processes2 if name == "processes" else None,
        ).params_sha256
        for name in ("sequential", "threads", "processes")
    }
    assert len(set(digests.values())) == 1, digests
    plain = simulate(attrs.evolve(base, augment=False)).params_sha256
    assert plain != digests["sequential"]  # the augmentation really ran


def test_augmentation_draws_from_the_client_key_only() -> None:
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = RunConfig(dataset="cifar10", data_dir="unused", augment=True)
    transform = train_transform(config)
    assert transform is not None
    with global_rng_untouched():
        a = transform(x, Key.from_seed(3).fold_in("augment").torch_generator())
        b = transform(x, Key.from_seed(3).fold_in("augment").torch_generator())
    assert torch.equal(a, b)
    assert train_transform(attrs.evolve(config, augment=False)) is None


@needs_mnist
def test_partition_command_shows_the_split_run_makes(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["partition", "--data-dir", str(MNIST), "--clients", "20", "--partition", "shards",
             "--seed", "7", "--json"]  # fmt: skip
    done = run_inline(capsys, *flags)
    assert done.returncode == 0, done.stderr
    config = RunConfig(dataset="mnist", data_dir=str(MNIST), clients=20, partition="shards", seed=7)
    data = load_federation(config, Key.from_seed(7).fold_in("data"))
    assert json.loads(done.stdout)["sizes"] == [len(c) for c in data.clients]
    labels = [torch.bincount(c.base.y[c.indices], minlength=10).tolist() for c in data.clients]
    assert json.loads(done.stdout)["counts"] == labels
