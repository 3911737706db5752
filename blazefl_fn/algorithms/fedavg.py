"""FedAvg (McMahan et al. 2017): local SGD, then the mean of client models weighted by examples."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..client.training import LocalTraining
from ..data.datasets import ClientData
from ..models import ModelFactory
from ..round import Algorithm
from .compose import Aggregate, compose

__all__ = ["fedavg"]


def fedavg(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
) -> Algorithm[ClientData, Mapping[str, torch.Tensor]]:
    """FedAvg: sample uniformly, train locally with SGD, average weighted by examples.

    Built by `blazefl_fn.algorithms.compose` with the plain ``Aggregate()`` stage (the weighted
    mean, which gives the bits of `mean_by_examples`), so `blazefl_fn.privacy.privatize.privatize`
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
        >>> from blazefl_fn.keys import Key
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = fedavg(functools.partial(logistic_regression, (60,), 10),
        ...               num_clients=30, clients_per_round=10, local=LocalTraining())
        >>> state = algo.init(Key.from_seed(0))
        >>> algo.name, sorted(state.params), state.aux
        ('fedavg', ['1.bias', '1.weight'], {})
    """
    return compose(
        "fedavg", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local, aggregate=Aggregate(),
    )  # fmt: skip
