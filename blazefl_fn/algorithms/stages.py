"""The stock stages the algorithms are built from: initialise, broadcast, train, average.

`ModelInit` builds the initial parameters from the run key; `broadcast_params` sends the
global parameters as they are; `TrainUpdate` is the client stage of the LocalSGD family (the
one local training loop, `blazefl_fn.client.training.train`, then the uplink), vectorised on
`blazefl_fn.executors.Vectorized`; `mean_by_examples` is FedAvg's aggregate and `mean_uniform`
the mean in which every sampled client counts once. `aggregate_only` and `aggregate_except` run an
aggregate stage on some of the model's entries (by name or module prefix) and keep the others as
they are: the server side of a model split into a shared body and a personal head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from ..client.chunk import client_bytes, train_chunk, vectorizable
from ..client.optim import matches
from ..client.training import LocalTraining, Trained, train
from ..data.datasets import ClientData
from ..keys import Key
from ..models import ModelFactory, build_module
from ..records import ClientTask, Downlink, ServerState, Uplink
from ..tree import from_module, select, weighted_mean

__all__ = [
    "AggregateStage",
    "ModelInit",
    "SelectedAggregate",
    "TrainUpdate",
    "aggregate_except",
    "aggregate_only",
    "broadcast_params",
    "mean_by_examples",
    "mean_uniform",
]

AggregateStage = Callable[[ServerState[Any], Sequence[Uplink]], ServerState[Any]]
"""An aggregate stage: the next state from the state and the round's uplinks."""


def broadcast_params(state: ServerState) -> Downlink:
    """Send the global parameters as they are."""
    return Downlink(round=state.round, params=state.params)


def mean_by_examples(state: ServerState, uplinks: Sequence[Uplink]) -> ServerState:
    """The next state: client parameters averaged with weights ``num_examples``.

    If every sampled client has zero examples the global parameters are kept.
    """
    weights = [u.num_examples for u in uplinks]
    if sum(weights) == 0:
        return attrs.evolve(state, round=state.round + 1)
    params = weighted_mean([u.params for u in uplinks], weights)
    return attrs.evolve(state, params=params, round=state.round + 1)


def mean_uniform(state: ServerState, uplinks: Sequence[Uplink]) -> ServerState:
    """The next state: the client parameters' plain mean, every sampled client counting once.

    Examples:
        >>> import torch
        >>> ups = [Uplink(0, 1, {"w": torch.tensor([0.0])}),
        ...        Uplink(1, 9, {"w": torch.tensor([2.0])})]
        >>> mean_uniform(ServerState({"w": torch.tensor([5.0])}), ups).params
        {'w': tensor([1.])}
    """
    if not uplinks:
        return attrs.evolve(state, round=state.round + 1)
    params = weighted_mean([u.params for u in uplinks], [1.0] * len(uplinks))
    return attrs.evolve(state, params=params, round=state.round + 1)


@attrs.frozen
class SelectedAggregate:
    """An aggregate stage run on the selected entries of the model; the others stay as they are.

    The inner stage sees the state and every uplink restricted to the selected entries (an
    uplink may carry only those: a client that keeps the rest to itself sends less); its
    ``aux`` and round are kept, the global model's other entries are the state's.

    Attributes:
        aggregate: the stage run on the selected entries (e.g. `mean_by_examples`).
        patterns: parameter names or module prefixes (`blazefl_fn.client.optim.matches`).
        keep: True aggregates the matching entries, False all the others.
    """

    aggregate: AggregateStage
    patterns: tuple[str, ...]
    keep: bool = True

    def names(self, params: Sequence[str]) -> list[str]:
        """The entries of a model with names ``params`` that are aggregated."""
        return [n for n in params if matches(n, self.patterns) == self.keep]

    def __call__(self, state: ServerState[Any], uplinks: Sequence[Uplink]) -> ServerState[Any]:
        """The next state: the inner stage's, with the unselected entries of ``state``."""
        names = self.names(list(state.params))
        inner = attrs.evolve(state, params=select(state.params, names))
        out = self.aggregate(
            inner, [attrs.evolve(u, params=select(u.params, names)) for u in uplinks]
        )
        params = {n: out.params.get(n, t) for n, t in state.params.items()}
        return attrs.evolve(out, params=params)


def _patterns(patterns: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not patterns or any(not isinstance(p, str) or not p.strip(".") for p in patterns):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"{what} needs parameter names or prefixes, got {patterns!r}")
    return tuple(patterns)


def aggregate_only(aggregate: AggregateStage, *patterns: str) -> SelectedAggregate:
    """``aggregate`` on the entries ``patterns`` name (names or module prefixes) only.

    Raises:
        ValueError: no pattern, or an empty one.

    Examples:
        >>> import torch
        >>> state = ServerState({"body.w": torch.zeros(1), "head.w": torch.zeros(1)})
        >>> ups = [Uplink(0, 1, {"body.w": torch.ones(1)})]  # the head stays on the client
        >>> aggregate_only(mean_by_examples, "body")(state, ups).params
        {'body.w': tensor([1.]), 'head.w': tensor([0.])}
    """
    return SelectedAggregate(aggregate, _patterns(patterns, "aggregate_only"), keep=True)


def aggregate_except(aggregate: AggregateStage, *patterns: str) -> SelectedAggregate:
    """``aggregate`` on every entry except those ``patterns`` name: they stay frozen.

    Raises:
        ValueError: no pattern, or an empty one.

    Examples:
        >>> import torch
        >>> state = ServerState({"body.w": torch.zeros(1), "head.w": torch.zeros(1)})
        >>> ups = [Uplink(0, 1, {"body.w": torch.ones(1), "head.w": torch.ones(1)})]
        >>> aggregate_except(mean_by_examples, "head")(state, ups).params["head.w"]
        tensor([0.])
    """
    return SelectedAggregate(aggregate, _patterns(patterns, "aggregate_except"), keep=False)


@attrs.frozen
class ModelInit:
    """An ``init`` stage: the model's initial parameters from the key, an empty ``aux``."""

    model_fn: ModelFactory

    def __call__(self, key: Key) -> ServerState:
        return ServerState(params=from_module(build_module(self.model_fn, key)))


@attrs.frozen
class TrainUpdate:
    """The client stage of the LocalSGD family: `train`, then uplink the trained parameters.

    The uplink carries the parameters, ``{"loss": mean training loss}`` and the steps taken.
    A record rather than a closure, so it can be sent to worker processes. It is a
    `blazefl_fn.executors.jobs.VectorizedUpdate`: `blazefl_fn.executors.Vectorized` trains a chunk
    of
    clients in one step with `update_chunk` (a ``training`` with loss terms one client at a
    time, as ``__call__`` does).

    Examples:
        >>> from blazefl_fn.client.optim import momentum
        >>> from blazefl_fn.models import logistic_regression
        >>> training = LocalTraining(optimizer=momentum(0.9))
        >>> TrainUpdate(logistic_regression((4,), 2), training).training.lr
        0.01
    """

    template: torch.nn.Module
    training: LocalTraining

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        """Train from the downlink's parameters with the client's key."""
        trained = train(self.template, downlink.params, data, task.key, self.training)
        return _uplink(task, data, trained)

    def update_chunk(
        self, downlink: Downlink, data: Sequence[ClientData], tasks: Sequence[ClientTask]
    ) -> list[Uplink]:
        """What ``__call__`` gives for each task, trained as one chunk (`train_chunk`)."""
        if not vectorizable(self.training):
            return [self(downlink, d, task) for d, task in zip(data, tasks, strict=True)]
        keys = [task.key for task in tasks]
        trained = train_chunk(self.template, downlink.params, data, keys, self.training)
        return [_uplink(task, d, t) for task, d, t in zip(tasks, data, trained, strict=True)]

    def client_bytes(self, downlink: Downlink, data: ClientData) -> int:
        """About how many bytes one client adds to a chunk (`client_bytes` of `client.chunk`)."""
        return client_bytes(self.template, downlink.params, data, self.training)


def _uplink(task: ClientTask, data: ClientData, trained: Trained) -> Uplink:
    return Uplink(
        client_id=task.client_id,
        num_examples=len(data),
        params=trained.params,
        metrics={"loss": trained.result.loss},
        steps=trained.result.steps,
    )
