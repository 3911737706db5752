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

from ._validators import finite_number, int_at_least, one_of
from .algorithms.fedavg import fedavg
from .data.datasets import FederatedDataset
from .data.mnist import mnist_federated
from .data.synthetic import synthetic
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
    "RoundCallback",
    "RunConfig",
    "RunResult",
    "run_rounds",
    "simulate",
]

ALGORITHMS = ("fedavg",)
DATASETS = ("synthetic", "mnist")
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

    def __attrs_post_init__(self) -> None:
        if self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})"
            )
        if self.dataset == "mnist" and self.data_dir is None:
            raise ValueError("dataset 'mnist' needs a data directory (data_dir / --data-dir)")


@attrs.frozen
class RunResult:
    """The outcome of `simulate`."""

    state: ServerState
    reports: tuple[RoundReport, ...]
    accuracy: float
    loss: float
    params_sha256: str
    wall_seconds: float


def load_federation(config: RunConfig, key: Key) -> FederatedDataset:
    """The federated dataset ``config`` names, built from ``key``.

    Raises:
        FileNotFoundError: the data directory or a file in it is missing.
        ValueError: a data file is malformed.
    """
    if config.dataset == "synthetic":
        return synthetic(config.synthetic_alpha, config.synthetic_beta, config.clients, key)
    assert config.data_dir is not None  # checked by RunConfig
    return mnist_federated(Path(config.data_dir), config.clients, key)


def model_factory(config: RunConfig, data: FederatedDataset) -> ModelFactory:
    """The model ``config.model`` names; ``auto`` is logreg on synthetic and mlp on MNIST."""
    name = config.model
    if name == "auto":
        name = "logreg" if config.dataset == "synthetic" else "mlp"
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
        local=LocalSGD(epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr),
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
