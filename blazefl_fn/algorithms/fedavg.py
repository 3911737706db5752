"""FedAvg (McMahan et al. 2017): local SGD, then the mean of client models weighted by examples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import torch

from ..data.datasets import ClientData
from ..keys import Key
from ..local_chunk import client_bytes, train_chunk, vectorizable
from ..local_training import LocalTraining, Trained, train
from ..records import Downlink, ServerState, Uplink
from ..reproducibility import ModelFactory, build_module
from ..round import Algorithm, ClientTask
from ..tree import from_module, weighted_mean

__all__ = [
    "ModelInit",
    "TrainUpdate",
    "broadcast_params",
    "fedavg",
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
    `blazefl_fn.jobs.VectorizedUpdate`: `blazefl_fn.executors.Vectorized` trains a chunk of
    clients in one step with `update_chunk` (a ``training`` with loss terms one client at a
    time, as ``__call__`` does).

    Examples:
        >>> from blazefl_fn.client_stages import momentum
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
        """About how many bytes one client adds to a chunk (`local_chunk.client_bytes`)."""
        return client_bytes(self.template, downlink.params, data, self.training)


def _uplink(task: ClientTask, data: ClientData, trained: Trained) -> Uplink:
    return Uplink(
        client_id=task.client_id,
        num_examples=len(data),
        params=trained.params,
        metrics={"loss": trained.result.loss},
        steps=trained.result.steps,
    )


def fedavg(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
) -> Algorithm[ClientData, Mapping[str, torch.Tensor]]:
    """FedAvg: sample uniformly, train locally with SGD, average weighted by examples.

    Built by `blazefl_fn.algorithms.compose` with the plain ``Aggregate()`` stage (the weighted
    mean, which gives the bits of `mean_by_examples`), so `blazefl_fn.privacy.privatize`
    accepts it.

    Args:
        model_fn: builds the model (a plain ``nn.Module``); the initial weights come from the
            run's key, whatever global seed is set.
        num_clients: clients in the federation.
        clients_per_round: clients sampled each round, without replacement.
        local: local training hyperparameters.

    Returns:
        The algorithm; its states' ``aux`` is empty (``{}``, typed
        ``Mapping[str, torch.Tensor]``), so pyright flags any ``state.aux.<field>``.

    Raises:
        ValueError: ``clients_per_round`` is not in ``[1, num_clients]``.

    Examples:
        >>> import functools
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = fedavg(functools.partial(logistic_regression, (60,), 10),
        ...               num_clients=30, clients_per_round=10, local=LocalTraining())
        >>> state = algo.init(Key.from_seed(0))
        >>> algo.name, sorted(state.params), state.aux
        ('fedavg', ['1.bias', '1.weight'], {})
    """
    from .compose import Aggregate, compose  # compose imports this module's stages

    return compose(
        "fedavg", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local, aggregate=Aggregate(),
    )  # fmt: skip
