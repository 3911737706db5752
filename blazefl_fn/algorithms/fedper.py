"""FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers").

The model is a shared body (base layers) and a personal head (the personalisation layers; the
last layer by default). Round ``t``, with ``phi`` the global body and ``h_k`` client ``k``'s
head:

1. the server sends the model (the head part is the initial head, which a client takes as its
   own at its first round);
2. client ``k`` trains body and head together by local SGD from ``(phi, h_k)``; it uploads the
   body and keeps the head;
3. the server averages the uploaded bodies weighted by examples (FedAvg on the base layers)
   and leaves the head as it is (`aggregate_except` of `mean_by_examples`).

Only the body travels up, so ``bytes_up`` counts the body alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from ..client.training import LocalTraining, train
from ..data.datasets import ClientData
from ..models import ModelFactory, build_template
from ..records import ClientTask, Downlink, Uplink
from ..round import Algorithm
from ..server.client_state import StoreOptions
from ._heads import body_and_head, with_head
from .personal import PersonalState, personalized, split_head
from .stages import aggregate_except, mean_by_examples

__all__ = ["FedPerUpdate", "fedper"]


@attrs.frozen
class FedPerUpdate:
    """FedPer's client stage: local training of the body under the client's own head.

    Attributes:
        template: the model.
        head: the personal entries (state-dict names).
        training: local training of the whole model.
    """

    template: torch.nn.Module
    head: tuple[str, ...]
    training: LocalTraining

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        """Train from the global body and the client's head; keep the head, send the body."""
        start = with_head(downlink.params, task.state, self.head)
        trained = train(self.template, start, data, task.key, self.training)
        body, head = body_and_head(trained.params, self.head)
        return Uplink(
            client_id=task.client_id,
            num_examples=len(data),
            params=body,
            metrics={"loss": trained.result.loss},
            state=head,
            steps=trained.result.steps,
        )


def fedper(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    head: Sequence[str] | None = None,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData, PersonalState]:
    """FedPer: a shared body averaged by examples, a personal head per client.

    Args:
        model_fn: the model.
        num_clients: the federation's size.
        clients_per_round: clients sampled uniformly each round.
        local: local training of body and head together.
        head: the personal entries by name or module prefix; None: the last layer
            (`blazefl_fn.algorithms.personal.last_layer`).
        store: the memory budget and spill directory of the heads.

    Raises:
        ValueError: a bad count, or a ``head`` that names nothing or the whole model.

    Examples:
        >>> import functools
        >>> from blazefl_fn.keys import Key
        >>> from blazefl_fn.models import mlp
        >>> algo = fedper(functools.partial(mlp, (60,), 10), num_clients=30,
        ...               clients_per_round=10, local=LocalTraining(), head=["3", "5"])
        >>> len(algo.init(Key.from_seed(0)).aux.clients.layout.entries)
        4
    """
    template = build_template(model_fn)
    names = split_head(template, head)
    return personalized(
        "fedper",
        model_fn,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        client_update=FedPerUpdate(template, names, local),
        aggregate=aggregate_except(mean_by_examples, *names),
        personal=names,
        store=store,
    )
