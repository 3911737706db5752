"""Whole simulations: a validated config in, the final state, reports and test metrics out.

Key layout of a run (``run_key = Key.from_seed(seed)``): ``run_key.fold_in("data")`` builds the
federated dataset, ``run_key.fold_in("init")`` the initial model, and round ``t`` uses
``run_key.fold_in(t)``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from ._validators import finite_number, int_at_least, one_of
from .algorithms.fedavg import fedavg
from .data.cifar import load_cifar10, load_cifar100
from .data.datasets import ClientData, FederatedDataset, TensorDataset
from .data.mnist import load_mnist
from .data.partition import Partition, dirichlet, iid, inner_dirichlet, shards
from .data.synthetic import synthetic
from .data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    Transform,
    cifar_train_transform,
    normalize,
)
from .executors.base import Executor
from .executors.processes import Processes
from .executors.sequential import Sequential
from .executors.threads import Threads
from .keys import Key
from .local import LocalSGD, evaluate
from .models import cnn, logistic_regression, mlp
from .records import RoundReport, ServerState
from .reproducibility import ModelFactory, build_module, intra_op_threads
from .round import RoundFn, make_round
from .tree import digest

__all__ = [
    "ALGORITHMS",
    "DATASETS",
    "EXECUTORS",
    "MODELS",
    "PARTITIONS",
    "RoundCallback",
    "RunConfig",
    "RunResult",
    "load_central",
    "load_federation",
    "make_executor",
    "model_factory",
    "run_rounds",
    "simulate",
    "split",
    "train_transform",
]

ALGORITHMS = ("fedavg",)
DATASETS = ("synthetic", "mnist", "cifar10", "cifar100")
PARTITIONS = ("iid", "dirichlet", "shards", "inner-dirichlet")
EXECUTORS = ("sequential", "threads", "processes")
MODELS = ("auto", "logreg", "mlp", "cnn")


@attrs.frozen(kw_only=True)
class RunConfig:
    """Everything that determines a simulation; the same config gives the same bits.

    The defaults are the FedProx paper's Synthetic(1, 1) setting (30 clients, 10 per round,
    batch 10, lr 0.01, multinomial logistic regression).

    Raises:
        ValueError: on construction, for any out-of-range value (the message names it).
    """

    algorithm: str = attrs.field(default="fedavg", validator=one_of(ALGORITHMS))
    dataset: str = attrs.field(default="synthetic", validator=one_of(DATASETS))
    data_dir: str | None = None
    model: str = attrs.field(default="auto", validator=one_of(MODELS))
    clients: int = attrs.field(default=30, validator=int_at_least(1))
    clients_per_round: int = attrs.field(default=10, validator=int_at_least(1))
    rounds: int = attrs.field(default=100, validator=int_at_least(0))
    local_epochs: int = attrs.field(default=1, validator=int_at_least(1))
    batch_size: int = attrs.field(default=10, validator=int_at_least(1))
    lr: float = attrs.field(default=0.01, validator=finite_number(positive=True))
    seed: int = attrs.field(default=0, validator=int_at_least(0))
    executor: str = attrs.field(default="sequential", validator=one_of(EXECUTORS))
    workers: int = attrs.field(default=2, validator=int_at_least(1))
    threads: int = attrs.field(default=1, validator=int_at_least(1))
    eval_every: int = attrs.field(default=1, validator=int_at_least(1))
    synthetic_alpha: float = attrs.field(default=1.0, validator=finite_number(positive=False))
    synthetic_beta: float = attrs.field(default=1.0, validator=finite_number(positive=False))
    partition: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of(PARTITIONS))
    )
    alpha: float = attrs.field(default=0.5, validator=finite_number(positive=True))
    shards_per_client: int = attrs.field(default=2, validator=int_at_least(1))
    augment: bool = False

    def __attrs_post_init__(self) -> None:
        if self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})"
            )
        if self.dataset != "synthetic" and self.data_dir is None:
            raise ValueError(
                f"dataset {self.dataset!r} needs a data directory (data_dir / --data-dir)"
            )
        if self.dataset == "synthetic" and self.partition is not None:
            raise ValueError(
                "the synthetic dataset is partitioned by its generator; partition applies to "
                "mnist, cifar10 and cifar100"
            )
        if self.augment and not self.dataset.startswith("cifar"):
            raise ValueError(
                f"augment (random crop + horizontal flip) applies to cifar10 and cifar100, "
                f"not to {self.dataset!r}"
            )


@attrs.frozen
class RunResult:
    """The outcome of `simulate`."""

    state: ServerState
    reports: tuple[RoundReport, ...]
    accuracy: float
    loss: float
    params_sha256: str
    wall_seconds: float


def _channel_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if dataset == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    return CIFAR100_MEAN, CIFAR100_STD


def load_central(config: RunConfig) -> tuple[TensorDataset, TensorDataset, int]:
    """The train and test sets and class count of the image dataset ``config`` names.

    CIFAR test inputs are normalised with the dataset's channel statistics here, once. So are
    the training inputs, unless ``config.augment``: then they stay in ``[0, 1]`` and
    `train_transform` crops (zero padding, as in the usual recipe), flips and normalises
    every batch.
    """
    assert config.data_dir is not None  # checked by RunConfig
    if config.dataset == "mnist":
        train, test = load_mnist(Path(config.data_dir))
        return train, test, 10
    if config.dataset == "cifar10":
        train, test = load_cifar10(Path(config.data_dir))
        classes = 10
    else:
        train, test = load_cifar100(Path(config.data_dir))
        classes = 100
    mean, std = _channel_stats(config.dataset)
    test = TensorDataset(normalize(test.x, mean, std), test.y)
    if not config.augment:
        train = TensorDataset(normalize(train.x, mean, std), train.y)
    return train, test, classes


def train_transform(config: RunConfig) -> Transform | None:
    """The augmentation of training batches: the CIFAR recipe if ``config.augment``, else None."""
    if not config.augment:
        return None
    return cifar_train_transform(*_channel_stats(config.dataset))


def split(config: RunConfig, labels: torch.Tensor, key: Key) -> Partition:
    """The partition ``config.partition`` names (IID by default) of examples with ``labels``."""
    name = config.partition or "iid"
    if name == "iid":
        return iid(int(labels.shape[0]), config.clients, key)
    if name == "dirichlet":
        return dirichlet(labels, config.clients, config.alpha, key)
    if name == "shards":
        return shards(labels, config.clients, config.shards_per_client, key)
    return inner_dirichlet(labels, config.clients, config.alpha, key)


def load_federation(config: RunConfig, key: Key) -> FederatedDataset:
    """The federated dataset ``config`` names, built from ``key``.

    Image datasets are split with ``key.fold_in("partition")``; every client is an index view
    onto the one training set.

    Raises:
        FileNotFoundError: the data directory or a file in it is missing.
        ValueError: a data file is malformed, or the partition cannot be made.
    """
    if config.dataset == "synthetic":
        return synthetic(config.synthetic_alpha, config.synthetic_beta, config.clients, key)
    train, test, classes = load_central(config)
    parts = split(config, train.y, key.fold_in("partition"))
    clients = tuple(ClientData(train, parts.client(i)) for i in range(len(parts)))
    return FederatedDataset(name=config.dataset, clients=clients, test=test, num_classes=classes)


def model_factory(config: RunConfig, data: FederatedDataset) -> ModelFactory:
    """The model ``config.model`` names; ``auto``: logreg on synthetic, mlp on MNIST, else cnn."""
    name = config.model
    if name == "auto":
        name = {"synthetic": "logreg", "mnist": "mlp"}.get(config.dataset, "cnn")
    builder = {"logreg": logistic_regression, "mlp": mlp, "cnn": cnn}[name]
    return functools.partial(builder, data.input_shape, data.num_classes)


def make_executor(config: RunConfig) -> Executor:
    """The executor ``config.executor`` names, with ``config.workers`` workers.

    Process workers use ``config.threads`` intra-op threads, like the driving process, so
    every executor computes the same bits.
    """
    if config.executor == "threads":
        return Threads(config.workers)
    if config.executor == "processes":
        return Processes(config.workers, threads=config.threads)
    return Sequential()


def run_rounds(
    round_fn: RoundFn,
    state: ServerState,
    run_key: Key,
    rounds: int,
    on_round: Callable[[ServerState, RoundReport], None] | None = None,
) -> tuple[ServerState, tuple[RoundReport, ...]]:
    """Apply ``round_fn`` ``rounds`` times, round ``t`` with key ``run_key.fold_in(t)``.

    Because the key of a round depends only on its index, a run that stops after round ``t``
    and continues from that state gives the same bits as an uninterrupted run.
    """
    reports: list[RoundReport] = []
    for _ in range(rounds):
        state, report = round_fn(state, run_key.fold_in(state.round))
        reports.append(report)
        if on_round is not None:
            on_round(state, report)
    return state, tuple(reports)


RoundCallback = Callable[[RoundReport, "dict[str, float] | None"], None]
"""Called after each round with its report and the test metrics when evaluated."""


def simulate(config: RunConfig, on_round: RoundCallback | None = None) -> RunResult:
    """Run the simulation ``config`` describes.

    Args:
        config: the run's settings.
        on_round: called after every round with its report and, every ``eval_every`` rounds
            and after the last, the test metrics (``None`` otherwise).

    Example:
        >>> result = simulate(RunConfig(rounds=2, clients=5, clients_per_round=2))
        >>> len(result.reports), len(result.params_sha256)
        (2, 64)
    """
    start = time.perf_counter()
    with intra_op_threads(config.threads):
        return _simulate(config, on_round, start)


def _simulate(config: RunConfig, on_round: RoundCallback | None, start: float) -> RunResult:
    run_key = Key.from_seed(config.seed)
    data = load_federation(config, run_key.fold_in("data"))
    model_fn = model_factory(config, data)
    algorithm = fedavg(
        model_fn,
        num_clients=len(data.clients),
        clients_per_round=config.clients_per_round,
        local=LocalSGD(
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            transform=train_transform(config),
        ),
    )
    template = build_module(model_fn, run_key.fold_in("template"))
    state = algorithm.init(run_key.fold_in("init"))
    metrics: dict[str, float] = {"accuracy": math.nan, "loss": math.nan}

    def after_round(new_state: ServerState, report: RoundReport) -> None:
        nonlocal metrics
        done = new_state.round
        evaluated = done % config.eval_every == 0 or done == config.rounds
        if evaluated:
            metrics = evaluate(template, new_state.params, data.test)
        if on_round is not None:
            on_round(report, metrics if evaluated else None)

    with make_executor(config) as executor:
        round_fn = make_round(algorithm, data.clients, executor)
        state, reports = run_rounds(round_fn, state, run_key, config.rounds, after_round)
    if config.rounds == 0:
        metrics = evaluate(template, state.params, data.test)
    return RunResult(
        state=state,
        reports=reports,
        accuracy=metrics["accuracy"],
        loss=metrics["loss"],
        params_sha256=digest(state.params),
        wall_seconds=time.perf_counter() - start,
    )
