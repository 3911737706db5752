"""The stock stages the algorithms are built from: initialise, broadcast, train, average.

`ModelInit` builds the initial parameters from the run key; `broadcast_params` sends the
global parameters as they are; `TrainUpdate` is the client stage of the LocalSGD family (the
one local training loop, `blazefl_fn.client.training.train`, then the uplink), vectorised on
`blazefl_fn.executors.Vectorized`; `mean_by_examples` is FedAvg's aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from ..client.chunk import client_bytes, train_chunk, vectorizable
from ..client.training import LocalTraining, Trained, train
from ..data.datasets import ClientData
from ..keys import Key
from ..models import ModelFactory, build_module
from ..records import ClientTask, Downlink, ServerState, Uplink
from ..tree import from_module, weighted_mean

__all__ = [
    "ModelInit",
    "TrainUpdate",
    "broadcast_params",
    "mean_by_examples",
]


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
