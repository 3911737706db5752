"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization").

Round ``t``, with ``w`` the global model and ``v_k`` client ``k``'s personal model:

1. the server sends ``w``;
2. client ``k`` trains a copy of ``w`` by local SGD (``local``) to ``w_k``, and, from its own
   ``v_k``, takes the personal steps ``v_k <- v_k - lr_p * (grad F_k(v_k) + lam * (v_k - w))``
   (``personal``, through the `add_proximal_to` stage toward the tree ``"global"``); it uploads
   ``w_k`` and keeps ``v_k``;
3. the server averages the ``w_k`` weighted by examples (FedAvg, the paper's global update).

A client's personal model starts, at its first round, from the global model it receives then
(the authors' code starts every personal model from the initial global one; the two agree for
clients sampled in round 0). The personal steps draw batches from the client key's
``"personal"`` child. The personal models are `PersonalState` trees: evaluate them per client
with `blazefl_fn.client.evaluation.evaluate_clients` (``personal=state.aux.clients``).
"""

from __future__ import annotations

import math

import attrs
import torch

from ..client.optim import add_proximal_to, chain
from ..client.training import LocalTraining, train
from ..data.datasets import ClientData
from ..models import ModelFactory, build_template
from ..records import ClientTask, Downlink, Uplink
from ..round import Algorithm
from ..server.client_state import StoreOptions
from .personal import PersonalState, personalized
from .stages import mean_by_examples

__all__ = ["DittoUpdate", "ditto", "ditto_personal"]


def ditto_personal(personal: LocalTraining, lam: float) -> LocalTraining:
    """``personal`` stepping along ``g + lam * (v - global)`` (then its own optimizer, if any).

    Raises:
        ValueError: ``lam`` is negative or not finite.

    Examples:
        >>> ditto_personal(LocalTraining(), 0.1).optimizer is not None
        True
    """
    pull = add_proximal_to("global", lam)
    optimizer = pull if personal.optimizer is None else chain(pull, personal.optimizer)
    return attrs.evolve(personal, optimizer=optimizer)


@attrs.frozen
class DittoUpdate:
    """Ditto's client stage: local SGD on the global model, then the personal steps.

    Attributes:
        template: the model.
        training: the global model's local training.
        personal: the personal model's, already `ditto_personal` (it reads ``"global"``).
    """

    template: torch.nn.Module
    training: LocalTraining
    personal: LocalTraining

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        """Upload the trained copy of the global model; keep the personal one."""
        w = downlink.params
        trained = train(self.template, w, data, task.key, self.training)
        v = task.state if task.state else w
        mine = train(
            self.template, v, data, task.key.fold_in("personal"), self.personal,
            trees={"global": w},
        )  # fmt: skip
        return Uplink(
            client_id=task.client_id,
            num_examples=len(data),
            params=trained.params,
            metrics={"loss": trained.result.loss, "personal_loss": mine.result.loss},
            state=mine.params,
            steps=trained.result.steps,
        )


def ditto(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    lam: float = 0.1,
    personal: LocalTraining | None = None,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData, PersonalState]:
    """Ditto with regularisation ``lam`` toward the global model.

    Args:
        model_fn: the model.
        num_clients: the federation's size.
        clients_per_round: clients sampled uniformly each round.
        local: the global model's local training (FedAvg's).
        lam: the personal objective's ``lam/2 ||v - w||^2`` weight (>= 0; 0 is local training).
        personal: the personal model's local training (its own epochs, batch size and step
            size); None uses ``local``'s.
        store: the memory budget and spill directory of the personal models.

    Raises:
        ValueError: ``clients_per_round`` not in ``[1, num_clients]``, or a bad ``lam``.

    Examples:
        >>> import functools
        >>> from blazefl_fn.keys import Key
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = ditto(functools.partial(logistic_regression, (60,), 10), num_clients=30,
        ...              clients_per_round=10, local=LocalTraining(), lam=0.5)
        >>> algo.name, algo.init(Key.from_seed(0)).aux.clients.num_stored
        ('ditto', 0)
    """
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not lam >= 0 or lam == math.inf:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"ditto's lam must be a finite number >= 0, got {lam!r}")
    steps = ditto_personal(local if personal is None else personal, lam)
    return personalized(
        "ditto",
        model_fn,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        client_update=DittoUpdate(build_template(model_fn), local, steps),
        aggregate=mean_by_examples,
        store=store,
    )
