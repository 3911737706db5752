"""SCARLET (Azuma et al.): DS-FL with synchronized soft-label caching and Enhanced ERA.

The server keeps a `SoftLabelCache` of global soft labels over the public set. In round ``t``
it picks public indices ``I_t`` as DS-FL does, but asks the clients only for those without a
fresh label (`label_cache.is_fresh`); the labels it uses for ``I_t`` are the fresh cached ones
plus the new aggregate, sharpened by Enhanced ERA ``p**beta / sum(p**beta)``.

Clients keep their own copy of the cache in their stored state, as the entries they hold
(sparse: ``"cache.indices"``, ``"cache.labels"``, ``"cache.produced"``). A label travels down
only when a client lacks it: each sampled client receives the entries of last round's targets
where its cache differs from the server's (the server records, per client that took part,
which version of each entry it holds: `ScarletState.known`, as sparse as the caches), plus one
`CacheSignal` per target that the client checks against its cache, so a cache that drifted
fails loudly instead of training on wrong labels. With every
client taking part each round this sends exactly the new labels; a client that missed rounds
is brought up to date with what it missed, and only for the labels it is about to use.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from .._validators import check_int_at_least
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
from ..tree import Params
from . import _distill
from .label_cache import CacheSignal, SoftLabelCache, is_fresh
from .soft_labels import enhanced_era, mean_soft_labels

__all__ = ["ScarletState", "client_cache", "known_versions", "scarlet"]

_INDICES = "cache.indices"
_LABELS = "cache.labels"
_PRODUCED = "cache.produced"


@attrs.frozen(eq=False)
class ScarletState:
    """SCARLET's server-side state (``ServerState.aux``).

    Attributes:
        server_key: the server's own key as 16 bytes (which public samples each round uses).
        cache: the global soft-label cache.
        target_indices: the public indices of the last round (the labels clients distill on).
        signals: their `CacheSignal`s as uint8.
        has_targets: False before the first round.
        known: the server's record of each client that took part: the public indices
            (``"indices"``) whose label the client holds and the round that produced each
            (``"produced"``); `known_versions` reads it as one row per client.
        clients: each client's stored state, for clients that took part: its local model
            (``"model."`` names) and the entries of its cache (``"cache.indices"``,
            ``"cache.labels"``, ``"cache.produced"``).
        clients_key: the key (16 bytes) each client's first model is made from.
    """

    server_key: torch.Tensor
    cache: SoftLabelCache
    target_indices: torch.Tensor
    signals: torch.Tensor
    has_targets: bool
    known: ClientStore
    clients: ClientStore
    clients_key: torch.Tensor


def client_cache(stored: Params, public_size: int) -> SoftLabelCache:
    """The soft-label cache in a SCARLET client's stored state, over the whole public set."""
    indices, labels = stored[_INDICES], stored[_LABELS]
    dense = torch.zeros(public_size, labels.shape[1], dtype=labels.dtype, device=labels.device)
    produced = torch.full((public_size,), -1, dtype=torch.int64, device=labels.device)
    dense[indices] = labels
    produced[indices] = stored[_PRODUCED]
    return SoftLabelCache(dense, produced)


def _cache_entries(cache: SoftLabelCache) -> dict[str, torch.Tensor]:
    """The entries of ``cache`` that hold a label, as stored state."""
    held = torch.nonzero(cache.produced >= 0).flatten()
    return {_INDICES: held, _LABELS: cache.labels[held], _PRODUCED: cache.produced[held]}


def known_versions(aux: ScarletState, client_id: int) -> torch.Tensor:
    """The round that produced the version of each public entry the server knows client
    ``client_id`` holds (``-1``: none), one value per public index."""
    record = aux.known[client_id]
    row = torch.full_like(aux.cache.produced, -1)
    if record:
        # A record restored from a checkpoint lies on the CPU; the server may be on a GPU.
        row[record["indices"].to(row.device)] = record["produced"].to(row.device)
    return row


def _record(row: torch.Tensor) -> dict[str, torch.Tensor]:
    held = torch.nonzero(row >= 0).flatten()
    return {"indices": held, "produced": row[held]}


@attrs.frozen
class _Init:
    model_fn: ModelFactory
    num_clients: int
    public_size: int
    public_per_round: int
    num_classes: int
    store: StoreOptions | None = None

    def __call__(self, key: Key) -> ServerState:
        empty = SoftLabelCache.empty(self.public_size, self.num_classes)
        params, server_key, clients_key = _distill.initial(self.model_fn, key)
        # Each client keeps its model, laid out as the server's, and its sparse cache (a row
        # per label it holds, at most one per public sample).
        cache = StateLayout(
            (
                (_INDICES, torch.int64, (None,)),
                (_LABELS, empty.labels.dtype, (None, self.num_classes)),
                (_PRODUCED, torch.int64, (None,)),
            ),
            max_free=self.public_size,
        )
        layout = StateLayout.of(params, prefix=_distill.MODEL).plus(cache)
        # One memory budget for the clients' state and the server's record of it.
        clients = initial_states(self.num_clients, self.store, layout)
        known = StateLayout(
            (("indices", torch.int64, (None,)), ("produced", torch.int64, (None,))),
            max_free=self.public_size,
        )
        aux = ScarletState(
            server_key=server_key,
            cache=empty,
            target_indices=torch.zeros(self.public_per_round, dtype=torch.int64),
            signals=torch.zeros(self.public_per_round, dtype=torch.uint8),
            has_targets=False,
            known=clients.cleared().laid_out(known),
            clients=clients,
            clients_key=clients_key,
        )
        return ServerState(params=params, aux=aux)


def _aux(state: ServerState) -> ScarletState:
    if not isinstance(state.aux, ScarletState):
        raise TypeError(
            f"SCARLET needs a ScarletState in ServerState.aux, got {type(state.aux).__name__}"
        )
    return state.aux


@attrs.frozen
class _Plan:
    """Which public indices a round uses and which of them it must request."""

    public_size: int
    public_per_round: int
    duration: int

    def __call__(self, state: ServerState) -> tuple[torch.Tensor, torch.Tensor]:
        aux = _aux(state)
        chosen = _distill.select_public(
            aux.server_key, state.round, self.public_size, self.public_per_round
        )
        return chosen, ~aux.cache.fresh(chosen, state.round, self.duration)


def _targets(aux: ScarletState) -> tuple[torch.Tensor, torch.Tensor]:
    if aux.has_targets:
        return aux.target_indices, aux.signals
    return aux.target_indices[:0], aux.signals[:0]


@attrs.frozen
class _Broadcast:
    plan: _Plan

    def __call__(self, state: ServerState) -> Downlink:
        chosen, requested = self.plan(state)
        indices, signals = _targets(_aux(state))
        params = {"request": chosen[requested], "target_indices": indices, "signals": signals}
        return Downlink(round=state.round, params=params)


@attrs.frozen
class _Dispatch:
    model_fn: ModelFactory

    def __call__(self, state: ServerState, ids: Sequence[int]) -> list[ClientInput]:
        aux = _aux(state)
        indices, _ = _targets(aux)
        inputs: list[ClientInput] = []
        for cid in ids:
            missing = aux.cache.stale(known_versions(aux, cid), indices)
            message = {
                "sync_indices": missing,
                "sync_labels": aux.cache.labels[missing],
                "sync_produced": aux.cache.produced[missing],
            }
            inputs.append(ClientInput(message=message, state=self._stored(aux, cid)))
        return inputs

    def _stored(self, aux: ScarletState, client_id: int) -> dict[str, torch.Tensor]:
        stored = aux.clients[client_id]
        if stored:
            return stored
        # A client's first state: its own first model and an empty cache.
        classes = aux.cache.labels.shape[1]
        none = aux.cache.produced[:0]
        return {
            **_distill.first_model(self.model_fn, aux.clients_key, client_id),
            _INDICES: none,
            _LABELS: aux.cache.labels[:0].reshape(0, classes),
            _PRODUCED: none,
        }


def _check_in_sync(
    cache: SoftLabelCache,
    indices: torch.Tensor,
    signals: torch.Tensor,
    used_in: int,
    duration: int,
    client_id: int,
) -> None:
    """Raise ValueError if the client's labels for ``indices`` are not the server's."""
    produced = cache.produced[indices]
    cached = signals == int(CacheSignal.CACHED)
    ok = torch.where(
        cached,
        is_fresh(produced, used_in, duration) & (produced < used_in),
        produced == used_in,
    )
    if not bool(ok.all()):
        bad = int(indices[~ok][0])
        raise ValueError(
            f"client {client_id}'s soft-label cache is out of sync at public index {bad}: "
            f"signal {CacheSignal(int(signals[~ok][0])).name} but its label is from round "
            f"{int(produced[~ok][0])} (used in round {used_in})"
        )


@attrs.frozen(eq=False)
class ScarletClient:
    """SCARLET's client stage (a record, so that worker processes can receive it)."""

    step: _distill.LocalStep
    duration: int

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        given, sync = downlink.params, task.message
        cache = client_cache(task.state, self.step.public.shape[0]).apply(
            sync["sync_indices"], sync["sync_labels"], sync["sync_produced"]
        )
        indices = given["target_indices"]
        if indices.numel() > 0:
            _check_in_sync(
                cache, indices, given["signals"], task.round - 1, self.duration, task.client_id
            )
        params, probs, metrics = self.step.run(
            _distill.model_part(task.state),
            (indices, cache.labels[indices]),
            given["request"],
            data,
            task.key,
        )
        state = _distill.with_model(task.state, params)
        state.update(_cache_entries(cache))
        return Uplink(
            client_id=task.client_id,
            num_examples=len(data),
            params={"probs": probs},
            metrics=metrics,
            state=state,
        )


@attrs.frozen(eq=False)
class _Aggregate:
    step: _distill.LocalStep
    plan: _Plan
    exponent: float

    def __call__(self, state: ServerState, uplinks: Sequence[Uplink]) -> ServerState:
        aux = _aux(state)
        chosen, requested = self.plan(state)
        signals = aux.cache.signals(chosen, state.round, self.plan.duration)
        cache = aux.cache
        if bool(requested.any()):
            mean = mean_soft_labels([u.params["probs"] for u in uplinks])
            cache = cache.put(chosen[requested], enhanced_era(mean, self.exponent), state.round)
        params = _distill.server_distill(
            self.step, state.params, chosen, cache.labels[chosen], aux.server_key, state.round
        )
        # Each participant now holds last round's targets as the server had them.
        indices, _ = _targets(aux)
        rows = {u.client_id: known_versions(aux, u.client_id) for u in uplinks}
        for row in rows.values():
            row[indices] = aux.cache.produced[indices]
        known = aux.known.updated({cid: _record(row) for cid, row in rows.items()})
        new_aux = attrs.evolve(
            aux,
            cache=cache,
            target_indices=chosen,
            signals=signals,
            has_targets=True,
            known=known,
            clients=collect_states(aux.clients, uplinks),
        )
        return attrs.evolve(state, params=params, round=state.round + 1, aux=new_aux)


def scarlet(
    model_fn: ModelFactory,
    *,
    public: torch.Tensor,
    num_classes: int,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    public_per_round: int = 1000,
    cache_duration: int = 10,
    exponent: float = 2.0,
    distillation: Distillation | None = None,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData]:
    """SCARLET: DS-FL with a synchronized soft-label cache and Enhanced ERA.

    Args:
        model_fn: builds the model used by the server and by every client.
        public: the public inputs (no labels), a batch ``(n, *input_shape)``.
        num_classes: classes of the task (the width of a soft label).
        num_clients: clients in the federation.
        clients_per_round: clients sampled each round.
        local: private training of each client.
        public_per_round: public samples the server uses each round.
        cache_duration: ``D``, how many rounds a cached label stays usable (0: no caching).
        exponent: the Enhanced ERA exponent ``beta`` (1: no sharpening).
        distillation: distillation settings for clients and server (default `Distillation()`).
        store: the memory budget the clients' stored state and the server's records of them
            share (`StoreOptions`).

    Raises:
        ValueError: an empty public set, ``public_per_round`` not in ``[1, len(public)]``,
            ``clients_per_round`` not in ``[1, num_clients]``, a negative ``cache_duration``
            or a bad exponent.

    Examples:
        >>> import functools, torch
        >>> from blazefl_fn.models import mlp
        >>> algo = scarlet(functools.partial(mlp, (4,), 3), public=torch.randn(50, 4),
        ...                num_classes=3, num_clients=5, clients_per_round=2,
        ...                local=LocalTraining(), public_per_round=20, cache_duration=5)
        >>> state = algo.init(Key.from_seed(0))
        >>> tuple(known_versions(state.aux, 4).shape), algo.broadcast(state).params["request"].shape
        ((50,), torch.Size([20]))
    """
    _distill.check_setup(public, public_per_round, num_clients, clients_per_round)
    check_int_at_least("cache_duration", cache_duration, 0)
    enhanced_era(torch.full((1, 2), 0.5), exponent)  # validates the exponent now
    distillation = distillation if distillation is not None else Distillation()
    initial_states(num_clients, store)  # checks the store options now, not at init
    template = build_template(model_fn)
    step = _distill.LocalStep(template, public, local, distillation, num_classes)
    plan = _Plan(public.shape[0], public_per_round, cache_duration)
    return Algorithm(
        name="scarlet",
        init=_Init(model_fn, num_clients, public.shape[0], public_per_round, num_classes, store),
        sample=uniform_sampler(num_clients, clients_per_round),
        broadcast=_Broadcast(plan),
        client_update=ScarletClient(step, cache_duration),
        aggregate=_Aggregate(step, plan, exponent),
        dispatch=_Dispatch(model_fn),
    )
