"""DS-FL (Itahara et al. 2021): clients share soft labels on a public set, not weights.

Round ``t``, with ``I_t`` the public indices the server picks for it:

1. the server sends ``I_t`` and last round's global soft labels for ``I_{t-1}``;
2. each sampled client distills its own model on those labels (KL divergence), trains on its
   private data and uploads ``softmax`` predictions for ``I_t``;
3. the server averages them, applies Entropy Reduction Aggregation ``softmax(mean / T)``,
   distills its own model (the state's ``params``) on the result and keeps it for round
   ``t + 1``.

Every client's local model persists between rounds: it is kept in a `ClientStore` in the
state's ``aux`` (`DSFLState.clients`; only clients that took part hold one, a client's first
model is made from its key when it is first sampled), handed to the client by the ``dispatch``
stage and returned in ``Uplink.state``; only soft labels and indices count as communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from ..client.distillation import Distillation
from ..client.training import LocalTraining
from ..data.datasets import ClientData
from ..keys import Key
from ..models import ModelFactory, build_template
from ..records import ClientInput, ClientTask, Downlink, ServerState, Uplink
from ..round import Algorithm
from ..server.client_state import (
    ClientStore,
    StateLayout,
    StoreOptions,
    collect_states,
    initial_states,
)
from ..server.sampling import uniform_sampler
from . import _distill
from .soft_labels import era, mean_soft_labels

__all__ = ["DSFLState", "dsfl"]


@attrs.frozen(eq=False)
class DSFLState:
    """DS-FL's server-side state (``ServerState.aux``).

    Attributes:
        server_key: the server's own key as 16 bytes (which public samples each round uses).
        targets: the global soft labels made in the last round, ``(per_round, classes)``.
        target_indices: the public indices they label.
        has_targets: False before the first round.
        clients: the stored state of each client that took part (its local model under
            ``"model."`` names).
        clients_key: the key (16 bytes) each client's first model is made from.
    """

    server_key: torch.Tensor
    targets: torch.Tensor
    target_indices: torch.Tensor
    has_targets: bool
    clients: ClientStore
    clients_key: torch.Tensor


@attrs.frozen
class _Init:
    model_fn: ModelFactory
    num_clients: int
    public_per_round: int
    num_classes: int
    store: StoreOptions | None = None

    def __call__(self, key: Key) -> ServerState:
        params, server_key, clients_key = _distill.initial(self.model_fn, key)
        aux = DSFLState(
            server_key=server_key,
            targets=torch.zeros(self.public_per_round, self.num_classes),
            target_indices=torch.zeros(self.public_per_round, dtype=torch.int64),
            has_targets=False,
            # Each client keeps its model, laid out as the server's.
            clients=initial_states(
                self.num_clients, self.store, StateLayout.of(params, prefix=_distill.MODEL)
            ),
            clients_key=clients_key,
        )
        return ServerState(params=params, aux=aux)


def _aux(state: ServerState) -> DSFLState:
    if not isinstance(state.aux, DSFLState):
        raise TypeError(
            f"DS-FL needs a DSFLState in ServerState.aux, got {type(state.aux).__name__}"
        )
    return state.aux


@attrs.frozen
class _Broadcast:
    public_size: int
    public_per_round: int

    def __call__(self, state: ServerState) -> Downlink:
        aux = _aux(state)
        request = _distill.select_public(
            aux.server_key, state.round, self.public_size, self.public_per_round
        )
        if aux.has_targets:
            targets, indices = aux.targets, aux.target_indices
        else:
            targets = aux.targets[:0]
            indices = aux.target_indices[:0]
        params = {"request": request, "target_indices": indices, "targets": targets}
        return Downlink(round=state.round, params=params)


@attrs.frozen
class _Dispatch:
    model_fn: ModelFactory

    def __call__(self, state: ServerState, ids: Sequence[int]) -> list[ClientInput]:
        aux = _aux(state)
        return [
            ClientInput(
                state=aux.clients[cid] or _distill.first_model(self.model_fn, aux.clients_key, cid)
            )
            for cid in ids
        ]


@attrs.frozen(eq=False)
class DSFLClient:
    """DS-FL's client stage (a record, so that worker processes can receive it)."""

    step: _distill.LocalStep

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        given = downlink.params
        params, probs, metrics = self.step.run(
            _distill.model_part(task.state),
            (given["target_indices"], given["targets"]),
            given["request"],
            data,
            task.key,
        )
        return Uplink(
            client_id=task.client_id,
            num_examples=len(data),
            params={"probs": probs},
            metrics=metrics,
            state=_distill.with_model(task.state, params),
        )


@attrs.frozen(eq=False)
class _Aggregate:
    step: _distill.LocalStep
    public_per_round: int
    temperature: float

    def __call__(self, state: ServerState, uplinks: Sequence[Uplink]) -> ServerState:
        aux = _aux(state)
        request = _distill.select_public(
            aux.server_key, state.round, self.step.public.shape[0], self.public_per_round
        )
        targets = era(mean_soft_labels([u.params["probs"] for u in uplinks]), self.temperature)
        params = _distill.server_distill(
            self.step, state.params, request, targets, aux.server_key, state.round
        )
        new_aux = attrs.evolve(
            aux,
            targets=targets,
            target_indices=request,
            has_targets=True,
            clients=collect_states(aux.clients, uplinks),
        )
        return attrs.evolve(state, params=params, round=state.round + 1, aux=new_aux)


def dsfl(
    model_fn: ModelFactory,
    *,
    public: torch.Tensor,
    num_classes: int,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    public_per_round: int = 1000,
    temperature: float = 0.1,
    distillation: Distillation | None = None,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData]:
    """DS-FL: distillation on a public set with Entropy Reduction Aggregation.

    Args:
        model_fn: builds the model used by the server and by every client.
        public: the public inputs (no labels), a batch ``(n, *input_shape)``.
        num_classes: classes of the task (the width of a soft label).
        num_clients: clients in the federation.
        clients_per_round: clients sampled each round.
        local: private training of each client.
        public_per_round: public samples the server asks predictions for each round.
        temperature: the ERA temperature ``T`` (``softmax(mean / T)``).
        distillation: distillation settings for clients and server (default `Distillation()`).
        store: the memory budget of the clients' stored models (`StoreOptions`).

    Raises:
        ValueError: an empty public set, ``public_per_round`` not in ``[1, len(public)]``,
            ``clients_per_round`` not in ``[1, num_clients]``, or a bad temperature.

    Examples:
        >>> import functools, torch
        >>> from blazefl_fn.models import mlp
        >>> algo = dsfl(functools.partial(mlp, (4,), 3), public=torch.randn(50, 4),
        ...             num_classes=3, num_clients=5, clients_per_round=2,
        ...             local=LocalTraining(), public_per_round=20)
        >>> state = algo.init(Key.from_seed(0))
        >>> state.aux.clients.num_stored, algo.broadcast(state).params["request"].shape
        (0, torch.Size([20]))
    """
    _distill.check_setup(public, public_per_round, num_clients, clients_per_round)
    era(torch.full((1, 2), 0.5), temperature)  # validates the temperature now, not in round 1
    distillation = distillation if distillation is not None else Distillation()
    initial_states(num_clients, store)  # checks the store options now, not at init
    template = build_template(model_fn)
    step = _distill.LocalStep(template, public, local, distillation, num_classes)
    return Algorithm(
        name="dsfl",
        init=_Init(model_fn, num_clients, public_per_round, num_classes, store),
        sample=uniform_sampler(num_clients, clients_per_round),
        broadcast=_Broadcast(public.shape[0], public_per_round),
        client_update=DSFLClient(step),
        aggregate=_Aggregate(step, public_per_round, temperature),
        dispatch=_Dispatch(model_fn),
    )
