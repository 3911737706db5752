"""FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated
Learning").

The model is a shared body (the representation) and a personal head (the last layer by
default). Round ``t``, with ``phi`` the global body and ``h_k`` client ``k``'s head:

1. the server sends the model (the body; the head part is the initial head, which a client
   takes as its own at its first round);
2. client ``k`` trains its head with the body frozen for ``head_epochs`` epochs
   (`train_only`), then the body with its new head frozen for ``local.epochs`` epochs
   (`freeze`); it uploads the body and keeps the head;
3. the server sets the body to the plain mean of the uploaded bodies (every sampled client
   counts once, the paper's ``1/(rn) sum_i phi_i``) and leaves the head as it is
   (`aggregate_only` of `mean_uniform`).

The head phase draws batches from the client key's ``"head"`` child, the body phase from its
``"body"`` child. Only the body travels up, so ``bytes_up`` counts the body alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from ..client.optim import GradientTransform, chain, freeze, train_only
from ..client.training import LocalTraining, train
from ..data.datasets import ClientData
from ..models import ModelFactory, build_template
from ..records import ClientTask, Downlink, Uplink
from ..round import Algorithm
from ..server.client_state import StoreOptions
from ._heads import body_and_head, with_head
from .personal import PersonalState, personalized, split_head
from .stages import aggregate_except, mean_uniform

__all__ = ["FedRepUpdate", "fedrep"]


@attrs.frozen
class FedRepUpdate:
    """FedRep's client stage: the head's epochs, then the body's; upload the body.

    Attributes:
        template: the model.
        head: the personal entries (state-dict names).
        head_training: local training of the head (its optimizer ends in `train_only`).
        body_training: local training of the body (its optimizer ends in `freeze`).
    """

    template: torch.nn.Module
    head: tuple[str, ...]
    head_training: LocalTraining
    body_training: LocalTraining

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        """Train the client's head, then the body under it; keep the head, send the body."""
        start = with_head(downlink.params, task.state, self.head)
        first = train(self.template, start, data, task.key.fold_in("head"), self.head_training)
        second = train(
            self.template, first.params, data, task.key.fold_in("body"), self.body_training
        )
        body, head = body_and_head(second.params, self.head)
        return Uplink(
            client_id=task.client_id,
            num_examples=len(data),
            params=body,
            metrics={"loss": second.result.loss, "head_loss": first.result.loss},
            state=head,
            steps=first.result.steps + second.result.steps,
        )


def fedrep(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    head_epochs: int = 10,
    head: Sequence[str] | None = None,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData, PersonalState]:
    """FedRep: personal heads trained first, then the shared body, which alone is averaged.

    Args:
        model_fn: the model.
        num_clients: the federation's size.
        clients_per_round: clients sampled uniformly each round.
        local: the body's local training (``local.epochs`` body epochs); the head trains with
            the same batch size and step size for ``head_epochs`` epochs.
        head_epochs: the head's epochs each round (the paper's 10 by default).
        head: the personal entries by name or module prefix; None: the last layer
            (`blazefl_fn.algorithms.personal.last_layer`).
        store: the memory budget and spill directory of the heads.

    Raises:
        ValueError: a bad count, a ``head`` that names nothing or the whole model.

    Examples:
        >>> import functools
        >>> from blazefl_fn.keys import Key
        >>> from blazefl_fn.models import mlp
        >>> algo = fedrep(functools.partial(mlp, (60,), 10), num_clients=30,
        ...               clients_per_round=10, local=LocalTraining(), head_epochs=2)
        >>> algo.init(Key.from_seed(0)).aux.clients.layout.entries[0][0]
        '5.bias'
    """
    if isinstance(head_epochs, bool) or not isinstance(head_epochs, int) or head_epochs < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"fedrep's head_epochs must be an integer >= 1, got {head_epochs!r}")
    template = build_template(model_fn)
    names = split_head(template, head)
    return personalized(
        "fedrep",
        model_fn,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        client_update=FedRepUpdate(
            template,
            names,
            attrs.evolve(local, epochs=head_epochs, optimizer=_then(train_only(*names), local)),
            attrs.evolve(local, optimizer=_then(freeze(*names), local)),
        ),
        aggregate=aggregate_except(mean_uniform, *names),
        personal=names,
        store=store,
    )


def _then(selection: GradientTransform, local: LocalTraining) -> GradientTransform:
    """The selection first, so that ``local``'s own stages see the selected gradients only."""
    return selection if local.optimizer is None else chain(selection, local.optimizer)
