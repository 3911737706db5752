"""The machinery every personalised algorithm shares: a global model and a personal tree per
client, kept in a `ClientStore`.

`personalized` builds an `Algorithm` from the two stages that make one algorithm differ from
another, its client update and its aggregate stage, and supplies the rest: ``init`` (the model
from the key, an empty store laid out as the personal entries), ``broadcast`` (the global
model), ``dispatch`` (each sampled client's personal tree as ``ClientTask.state``; empty before
its first round) and, after the aggregate, ``collect`` (each uplink's ``state`` stored for its
client). The personal trees live in ``ServerState.aux`` as a `PersonalState`: budgeted,
spilled to files beyond the budget, checkpointed with the run, and evaluated per client by
`blazefl_fn.client.evaluation.evaluate_clients` (``personal=state.aux.clients``).

Ditto (`blazefl_fn.algorithms.ditto`), FedRep (`blazefl_fn.algorithms.fedrep`) and FedPer
(`blazefl_fn.algorithms.fedper`) are each one call of `personalized`; the guide's section
"Writing a personalised algorithm" writes another.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from ..client.optim import matches
from ..data.datasets import ClientData
from ..executors.jobs import ClientUpdate
from ..keys import Key
from ..models import ModelFactory, build_module, build_template
from ..records import ClientInput, ServerState, Uplink
from ..round import Algorithm
from ..server.client_state import (
    ClientStates,
    StateLayout,
    StoreOptions,
    collect_states,
    dispatch_states,
    initial_states,
)
from ..server.sampling import uniform_sampler
from ..tree import from_module, select
from .stages import AggregateStage, broadcast_params

__all__ = [
    "PersonalState",
    "last_layer",
    "personal_dispatch",
    "personal_names",
    "personalized",
    "split_head",
]


@attrs.frozen(eq=False)
class PersonalState:
    """A personalised algorithm's server state (``ServerState.aux``).

    Attributes:
        clients: each client's personal tree (empty: the client has not taken part yet).
    """

    clients: ClientStates


def last_layer(template: torch.nn.Module) -> str:
    """The module prefix of ``template``'s last trainable parameter: the classifier head.

    Raises:
        ValueError: the model has no trainable parameter.

    Examples:
        >>> last_layer(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
        ...                                torch.nn.Linear(3, 2)))
        '2'
    """
    names = [n for n, p in template.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameter, so no head")
    return names[-1].rpartition(".")[0] or names[-1]


def personal_names(template: torch.nn.Module, patterns: Sequence[str]) -> tuple[str, ...]:
    """The state-dict entries of ``template`` that ``patterns`` name (names or prefixes).

    Raises:
        ValueError: a pattern names no entry (the message lists the model's entries).
    """
    entries = list(template.state_dict())
    for pattern in patterns:
        if not any(matches(n, (pattern,)) for n in entries):
            raise ValueError(f"{pattern!r} names no entry of the model (it has {entries})")
    return tuple(n for n in entries if matches(n, tuple(patterns)))


def split_head(template: torch.nn.Module, patterns: Sequence[str] | None) -> tuple[str, ...]:
    """The head's state-dict names (`personal_names`; None: the `last_layer`), refusing a
    head without a body.

    Raises:
        ValueError: a pattern names no entry, or the head holds every trainable parameter.

    Examples:
        >>> split_head(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), ["1"])
        ('1.weight', '1.bias')
    """
    if patterns is None:
        patterns = (last_layer(template),)
    names = personal_names(template, patterns)
    body = [n for n, p in template.named_parameters() if p.requires_grad and n not in names]
    if not body:
        raise ValueError(
            f"head {list(patterns)} holds every trainable parameter of the model, leaving no "
            "shared body (use a model with more than one layer, e.g. mlp or cnn)"
        )
    return names


@attrs.frozen
class _Init:
    model_fn: ModelFactory
    num_clients: int
    layout: StateLayout
    store: StoreOptions | None

    def __call__(self, key: Key) -> ServerState[PersonalState]:
        params = from_module(build_module(self.model_fn, key))
        clients = initial_states(self.num_clients, self.store, self.layout)
        return ServerState(params, aux=PersonalState(clients))


def personal_dispatch(state: ServerState[PersonalState], ids: Sequence[int]) -> list[ClientInput]:
    """Each sampled client's personal tree as its stored state (empty before its first round)."""
    return dispatch_states(state.aux.clients, ids)


@attrs.frozen
class _Collect:
    aggregate: AggregateStage

    def __call__(
        self, state: ServerState[PersonalState], uplinks: Sequence[Uplink]
    ) -> ServerState[PersonalState]:
        out = self.aggregate(state, uplinks)
        clients = collect_states(state.aux.clients, uplinks)
        return ServerState(out.params, out.round, PersonalState(clients))


def personalized(
    name: str,
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    client_update: ClientUpdate[ClientData],
    aggregate: AggregateStage,
    personal: Sequence[str] | None = None,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData, PersonalState]:
    """A personalised algorithm from its client update and its aggregate stage.

    Args:
        name: the algorithm's name.
        model_fn: the model.
        num_clients: the federation's size.
        clients_per_round: clients sampled uniformly each round.
        client_update: the client stage; it reads its personal tree from ``task.state``
            (empty before its first round) and returns the new one as ``Uplink.state``.
        aggregate: the next global model from the uplinks (e.g. `mean_by_examples`, or
            `aggregate_only` of it when clients upload part of the model); its ``aux`` is
            replaced by the collected personal trees.
        personal: the entries each client keeps (names or module prefixes); None keeps a
            whole model per client. Every stored tree must hold exactly these (`StateLayout`).
        store: the memory budget and spill directory of the personal trees.

    Raises:
        ValueError: ``clients_per_round`` not in ``[1, num_clients]``, or a pattern of
            ``personal`` that names no entry of the model.

    Examples:
        >>> import functools
        >>> from blazefl_fn.client.training import LocalSGD
        >>> from blazefl_fn.models import mlp
        >>> from blazefl_fn.algorithms.stages import TrainUpdate, mean_by_examples
        >>> model_fn = functools.partial(mlp, (4,), 2, hidden=(8,))
        >>> algo = personalized("mine", model_fn, num_clients=5, clients_per_round=2,
        ...     client_update=TrainUpdate(build_template(model_fn), LocalSGD()),
        ...     aggregate=mean_by_examples, personal=["3"])
        >>> algo.init(Key.from_seed(0)).aux.clients.layout.entries[0][:2]
        ('3.bias', torch.float32)
    """
    initial_states(num_clients, store)  # checks the size and options now, not at init
    template = build_template(model_fn)
    shapes = template.state_dict()
    names = tuple(shapes) if personal is None else personal_names(template, personal)
    layout = StateLayout.of(select(shapes, names))
    return Algorithm(
        name=name,
        init=_Init(model_fn, num_clients, layout, store),
        sample=uniform_sampler(num_clients, clients_per_round),
        broadcast=broadcast_params,
        client_update=client_update,
        aggregate=_Collect(aggregate),
        dispatch=personal_dispatch,
    )
