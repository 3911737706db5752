"""SCARLET (Azuma et al.): DS-FL with synchronized soft-label caching and Enhanced ERA.

The server keeps a `SoftLabelCache` of global soft labels over the public set. In round ``t``
it picks public indices ``I_t`` as DS-FL does, but asks the clients only for those without a
fresh label (`label_cache.is_fresh`); the labels it uses for ``I_t`` are the fresh cached ones
plus the new aggregate, sharpened by Enhanced ERA ``p**beta / sum(p**beta)``.

Clients keep their own copy of the cache in their stored state. A label travels down only
when a client lacks it: each sampled client receives the entries of last round's targets
where its cache differs from the server's (the server records, per client, which version of
each entry it holds), plus one `CacheSignal` per target that the client checks against its
cache, so a cache that drifted fails loudly instead of training on wrong labels. With every
client taking part each round this sends exactly the new labels; a client that missed rounds
is brought up to date with what it missed, and only for the labels it is about to use.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from .._validators import check_int_at_least
from ..data.datasets import ClientData
from ..keys import Key
from ..local import Distillation, LocalSGD
from ..records import Downlink, ServerState, Uplink
from ..reproducibility import ModelFactory, build_template
from ..round import Algorithm, ClientInput, ClientTask, uniform_sampler
from ..tree import Params
from . import _distill
from .label_cache import CacheSignal, SoftLabelCache, is_fresh
from .soft_labels import enhanced_era, mean_soft_labels

__all__ = ["ScarletState", "client_cache", "scarlet"]

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
        known: ``(num_clients, public_size)``: the round that produced the version of each
            entry the server knows a client holds (``-1``: none) — its record of each client.
        clients: each client's stored state: its local model (``"model."`` names) and its
            cache (``"cache.labels"``, ``"cache.produced"``).
    """

    server_key: torch.Tensor
    cache: SoftLabelCache
    target_indices: torch.Tensor
    signals: torch.Tensor
    has_targets: bool
    known: torch.Tensor
    clients: tuple[Params, ...]


def client_cache(stored: Params) -> SoftLabelCache:
    """The soft-label cache in a SCARLET client's stored state."""
    return SoftLabelCache(stored[_LABELS], stored[_PRODUCED])


@attrs.frozen
class _Init:
    model_fn: ModelFactory
    num_clients: int
    public_size: int
    public_per_round: int
    num_classes: int

    def __call__(self, key: Key) -> ServerState:
        empty = SoftLabelCache.empty(self.public_size, self.num_classes)
        params, server_key, models = _distill.initial(self.model_fn, key, self.num_clients)
        # Every client starts from the same empty cache; nothing writes into it.
        clients = tuple(
            {**model, _LABELS: empty.labels, _PRODUCED: empty.produced} for model in models
        )
        aux = ScarletState(
            server_key=server_key,
            cache=empty,
            target_indices=torch.zeros(self.public_per_round, dtype=torch.int64),
            signals=torch.zeros(self.public_per_round, dtype=torch.uint8),
            has_targets=False,
            known=torch.full((self.num_clients, self.public_size), -1, dtype=torch.int64),
            clients=clients,
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


def _dispatch(state: ServerState, ids: Sequence[int]) -> list[ClientInput]:
    aux = _aux(state)
    indices, _ = _targets(aux)
    inputs: list[ClientInput] = []
    for cid in ids:
        missing = aux.cache.stale(aux.known[cid], indices)
        message = {
            "sync_indices": missing,
            "sync_labels": aux.cache.labels[missing],
            "sync_produced": aux.cache.produced[missing],
        }
        inputs.append(ClientInput(message=message, state=aux.clients[cid]))
    return inputs


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
        cache = client_cache(task.state).apply(
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
        state.update({_LABELS: cache.labels, _PRODUCED: cache.produced})
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
        known = aux.known.clone()
        indices, _ = _targets(aux)
        for uplink in uplinks:
            known[uplink.client_id, indices] = aux.cache.produced[indices]
        new_aux = attrs.evolve(
            aux,
            cache=cache,
            target_indices=chosen,
            signals=signals,
            has_targets=True,
            known=known,
            clients=_distill.stored_states(aux.clients, uplinks),
        )
        return attrs.evolve(state, params=params, round=state.round + 1, aux=new_aux)


def scarlet(
    model_fn: ModelFactory,
    *,
    public: torch.Tensor,
    num_classes: int,
    num_clients: int,
    clients_per_round: int,
    local: LocalSGD,
    public_per_round: int = 1000,
    cache_duration: int = 10,
    exponent: float = 2.0,
    distillation: Distillation | None = None,
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

    Raises:
        ValueError: an empty public set, ``public_per_round`` not in ``[1, len(public)]``,
            ``clients_per_round`` not in ``[1, num_clients]``, a negative ``cache_duration``
            or a bad exponent.

    Examples:
        >>> import functools, torch
        >>> from blazefl_fn.models import mlp
        >>> algo = scarlet(functools.partial(mlp, (4,), 3), public=torch.randn(50, 4),
        ...                num_classes=3, num_clients=5, clients_per_round=2,
        ...                local=LocalSGD(), public_per_round=20, cache_duration=5)
        >>> state = algo.init(Key.from_seed(0))
        >>> tuple(state.aux.known.shape), algo.broadcast(state).params["request"].shape
        ((5, 50), torch.Size([20]))
    """
    _distill.check_setup(public, public_per_round, num_clients, clients_per_round)
    check_int_at_least("cache_duration", cache_duration, 0)
    enhanced_era(torch.full((1, 2), 0.5), exponent)  # validates the exponent now
    distillation = distillation if distillation is not None else Distillation()
    template = build_template(model_fn)
    step = _distill.LocalStep(template, public, local, distillation, num_classes)
    plan = _Plan(public.shape[0], public_per_round, cache_duration)
    return Algorithm(
        name="scarlet",
        init=_Init(model_fn, num_clients, public.shape[0], public_per_round, num_classes),
        sample=uniform_sampler(num_clients, clients_per_round),
        broadcast=_Broadcast(plan),
        client_update=ScarletClient(step, cache_duration),
        aggregate=_Aggregate(step, plan, exponent),
        dispatch=_dispatch,
    )
