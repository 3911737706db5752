"""Algorithms as compositions: a client stage (local training + optimizer stages) and an aggregate
stage (optional delta clipping -> aggregator -> optional server transform).

Every algorithm of the library is a call of `compose` with a few stages:

============  ===============================  ======================================  =============
algorithm     client stage                     aggregate stage                         ``aux``
============  ===============================  ======================================  =============
fedavg        local SGD                        weighted mean                           ``{}``
fedprox       local SGD + `add_proximal` (mu)  weighted mean                           ``{}``
fedavgm       local SGD                        weighted mean -> `momentum` (lr, beta)  MomentumState
fedadam       local SGD                        weighted mean -> `adam` (Reddi et al.)  AdaptiveState
fedyogi       local SGD                        weighted mean -> `yogi`                 AdaptiveState
fedadagrad    local SGD                        weighted mean -> `adagrad`              AdaptiveState
fedmedian     local SGD                        coordinate-wise median                  ``{}``
trimmed-mean  local SGD                        trimmed mean (beta)                     ``{}``
krum          local SGD                        Krum / Multi-Krum (f, m)                ``{}``
============  ===============================  ======================================  =============

The ``aux`` column is what `ServerState.aux` holds, and each function's return type says it:
``{}`` is typed ``Mapping[str, torch.Tensor]`` (``fl.Algorithm[fl.ClientData,
Mapping[str, torch.Tensor]]``), the others are the server optimizer's state record
(`blazefl_fn.server.optim`), so that pyright flags a misspelt ``state.aux`` field.

Any of them takes ``clip_norm``: each client's delta (its parameters minus the global ones) is
clipped to that global L2 norm before aggregation.

Buffers (BatchNorm's running statistics and batch counters) are not parameters: by default
(``Aggregate(buffers="aggregate")``) clipping and the server optimizer act on the trainable
parameters only, and the buffers are combined on their own: floating-point ones by the same
aggregator (so the weighted mean under ``mean``, and a robust aggregator stays robust for
them too), integer counters by the rounded weighted mean. ``buffers="with_params"`` treats them
as parameters (the behaviour before this policy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, cast, overload

import attrs
import torch
from typing_extensions import TypeVar

from ..client.optim import add_proximal, chain
from ..client.training import LocalTraining, trainable_names
from ..data.datasets import ClientData
from ..keys import Key
from ..models import ModelFactory, build_module, build_template
from ..records import ServerState, Uplink
from ..round import Algorithm
from ..server.aggregators import Aggregator, clip_by_norm, krum, mean, median, trimmed_mean
from ..server.optim import (
    AdaptiveState,
    MomentumState,
    ServerTransform,
    adagrad,
    adam,
    apply_updates,
    momentum,
    round_delta,
    server_step,
    yogi,
)
from ..server.sampling import uniform_sampler
from ..tree import from_module, select
from ._stateful import merge_buffers
from .stages import TrainUpdate, broadcast_params

__all__ = [
    "Aggregate",
    "compose",
    "fedadagrad",
    "fedadam",
    "fedavgm",
    "fedmedian",
    "fedprox",
    "fedyogi",
    "krum_fedavg",
    "trimmed_mean_fedavg",
]


# The aux of the states an `Aggregate` maps, which its arguments decide (its ``__init__``
# overloads). Covariant, so that a dict of different stages can feed `compose`.
Aux = TypeVar("Aux", covariant=True, default=Any)
A = TypeVar("A")
S = TypeVar("S")


@attrs.frozen
class _Init:
    """The aux `Aggregate`'s overloads promise: ``{}`` or the server transform's state."""

    model_fn: ModelFactory
    server: ServerTransform[Any] | None
    trainable: tuple[str, ...] | None = None

    def __call__(self, key: Key) -> ServerState[Any]:
        params = from_module(build_module(self.model_fn, key))
        stepped = params if self.trainable is None else select(params, self.trainable)
        aux: object = {} if self.server is None else self.server.init(stepped)
        return ServerState(params=params, aux=aux)


@attrs.frozen
class Aggregate(Generic[Aux]):
    """The aggregate stage: clip client deltas, aggregate weighted by examples, server step.

    Generic in the ``aux`` of the states it maps, which its arguments decide:
    ``Aggregate()`` is an ``Aggregate[Mapping[str, torch.Tensor]]`` (the empty aux, ``{}``),
    ``Aggregate(server=momentum(...))`` an ``Aggregate[MomentumState]`` (the server
    transform's state). Central DP wraps it (`blazefl_fn.privacy.privatize.PrivateAggregate`,
    which `blazefl_fn.privacy.privatize.privatize` builds).

    Attributes:
        aggregator: combines the (clipped) client parameters with weights ``num_examples``.
        server: a server transform on ``aggregated - global`` whose state lives in
            ``ServerState.aux``; None takes the aggregate as the new global parameters.
        clip_norm: clip each client's delta to this global L2 norm first; None does not clip.
        buffers: ``"aggregate"``: clipping and the server step see only the ``trainable``
            entries; the others (BatchNorm statistics) are combined by ``aggregator`` on their
            own, integer counters by the rounded weighted mean. ``"with_params"``: every entry
            is treated as a parameter.
        trainable: the names of the trainable parameters (`compose` fills it in from the
            model); None treats every entry as a parameter.

    If every sampled client has zero examples, the state only advances its round.
    """

    aggregator: Aggregator = mean
    server: ServerTransform[Any] | None = None
    clip_norm: float | None = None
    buffers: Literal["aggregate", "with_params"] = attrs.field(
        default="aggregate", validator=attrs.validators.in_(("aggregate", "with_params"))
    )
    trainable: tuple[str, ...] | None = None

    if TYPE_CHECKING:  # attrs writes the __init__; these say which aux the arguments make.

        @overload
        def __init__(
            self: Aggregate[Mapping[str, torch.Tensor]],
            aggregator: Aggregator = mean,
            server: None = None,
            clip_norm: float | None = None,
            buffers: Literal["aggregate", "with_params"] = "aggregate",
            trainable: tuple[str, ...] | None = None,
        ) -> None: ...
        @overload
        def __init__(
            self: Aggregate[S],
            aggregator: Aggregator = mean,
            server: ServerTransform[S] = ...,
            clip_norm: float | None = None,
            buffers: Literal["aggregate", "with_params"] = "aggregate",
            trainable: tuple[str, ...] | None = None,
        ) -> None: ...
        def __init__(
            self,
            aggregator: Aggregator = mean,
            server: ServerTransform[Any] | None = None,
            clip_norm: float | None = None,
            buffers: Literal["aggregate", "with_params"] = "aggregate",
            trainable: tuple[str, ...] | None = None,
        ) -> None: ...

    def stepped_names(self) -> tuple[str, ...] | None:
        """The entries clipping, aggregation and the server step act on (None: all)."""
        return self.trainable if self.buffers == "aggregate" else None

    def __call__(
        self: Aggregate[A], state: ServerState[A], uplinks: Sequence[Uplink]
    ) -> ServerState[A]:
        """The next state from the uplinks."""
        weights = [u.num_examples for u in uplinks]
        if sum(weights) == 0:
            return attrs.evolve(state, round=state.round + 1)
        names = self.stepped_names()
        full = [u.params for u in uplinks]
        trees = full if names is None else [select(t, names) for t in full]
        current = state.params if names is None else select(state.params, names)
        if self.clip_norm is not None:
            clip = self.clip_norm
            trees = [
                apply_updates(current, clip_by_norm(round_delta(t, current), clip)) for t in trees
            ]
        aggregated = self.aggregator(trees, weights)
        aux = state.aux
        if self.server is not None:
            aggregated, aux = server_step(self.server, current, aggregated, cast(Any, aux))
        if names is not None:
            aggregated = merge_buffers(aggregated, state.params, full, weights, self.aggregator)
        return ServerState(params=aggregated, round=state.round + 1, aux=aux)


def compose(
    name: str,
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    aggregate: Aggregate[A],
) -> Algorithm[ClientData, A]:
    """An algorithm from its stages: uniform sampling, ``local`` training, ``aggregate``.

    Returns:
        The algorithm, typed by the ``aux`` its states hold, which is the aggregate stage's
        (`Aggregate`): ``Mapping[str, torch.Tensor]`` (an empty dict) without a server
        transform, the transform's state with one (``MomentumState`` for ``momentum``).

    Raises:
        ValueError: ``clients_per_round`` is not in ``[1, num_clients]``.

    Examples:
        >>> import functools
        >>> from blazefl_fn.models import logistic_regression
        >>> from blazefl_fn.server.optim import momentum
        >>> algo = compose("my-fedavgm", functools.partial(logistic_regression, (60,), 10),
        ...                num_clients=30, clients_per_round=10, local=LocalTraining(),
        ...                aggregate=Aggregate(server=momentum(lr=1.0, beta=0.9)))
        >>> type(algo.init(Key.from_seed(0)).aux).__name__
        'MomentumState'
    """
    sample = uniform_sampler(num_clients, clients_per_round)
    template = build_template(model_fn)
    if aggregate.trainable is None:
        aggregate = attrs.evolve(aggregate, trainable=trainable_names(template, aliases=True))
    return Algorithm(
        name=name,
        init=_Init(model_fn, aggregate.server, aggregate.stepped_names()),
        sample=sample,
        broadcast=broadcast_params,
        client_update=TrainUpdate(template, local),
        aggregate=aggregate,
    )


def fedprox(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    mu: float,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, Mapping[str, torch.Tensor]]:
    """FedProx (Li et al. 2020): local SGD with the proximal term ``mu/2 ||w - w_global||^2``.

    Returns:
        The algorithm; its states' ``aux`` is empty (``{}``, typed
        ``Mapping[str, torch.Tensor]``).
    """
    term = add_proximal(mu)
    hooked = attrs.evolve(
        local, optimizer=term if local.optimizer is None else chain(local.optimizer, term)
    )
    return compose(
        "fedprox", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=hooked, aggregate=Aggregate(clip_norm=clip_norm),
    )  # fmt: skip


def fedavgm(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    server_lr: float = 1.0,
    beta: float = 0.9,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, MomentumState]:
    """FedAvgM (Hsu et al. 2019): server momentum on the averaged update.

    Returns:
        The algorithm; its states' ``aux`` is the server optimizer's `MomentumState`.
    """
    return compose(
        "fedavgm", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local, aggregate=Aggregate(server=momentum(server_lr, beta), clip_norm=clip_norm),
    )  # fmt: skip


def fedadam(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    server_lr: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, AdaptiveState]:
    """FedAdam (Reddi et al. 2021): Adam on the averaged update, no bias correction.

    Returns:
        The algorithm; its states' ``aux`` is the server optimizer's `AdaptiveState`.
    """
    return compose(
        "fedadam", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local,
        aggregate=Aggregate(server=adam(server_lr, b1, b2, tau), clip_norm=clip_norm),
    )  # fmt: skip


def fedyogi(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    server_lr: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, AdaptiveState]:
    """FedYogi (Reddi et al. 2021): Yogi's additive second moment on the averaged update.

    Returns:
        The algorithm; its states' ``aux`` is the server optimizer's `AdaptiveState`.
    """
    return compose(
        "fedyogi", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local,
        aggregate=Aggregate(server=yogi(server_lr, b1, b2, tau), clip_norm=clip_norm),
    )  # fmt: skip


def fedadagrad(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    server_lr: float = 0.1,
    tau: float = 1e-3,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, AdaptiveState]:
    """FedAdagrad (Reddi et al. 2021): Adagrad on the averaged update.

    Returns:
        The algorithm; its states' ``aux`` is the server optimizer's `AdaptiveState`.
    """
    return compose(
        "fedadagrad", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local, aggregate=Aggregate(server=adagrad(server_lr, tau), clip_norm=clip_norm),
    )  # fmt: skip


def fedmedian(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, Mapping[str, torch.Tensor]]:
    """FedMedian (Yin et al. 2018): the coordinate-wise median of the client models.

    Returns:
        The algorithm; its states' ``aux`` is empty (``{}``, typed
        ``Mapping[str, torch.Tensor]``).
    """
    return compose(
        "fedmedian", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local, aggregate=Aggregate(aggregator=median, clip_norm=clip_norm),
    )  # fmt: skip


def trimmed_mean_fedavg(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    beta: float = 0.1,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, Mapping[str, torch.Tensor]]:
    """Trimmed-mean FedAvg (Yin et al. 2018): per coordinate, drop the ``beta`` fraction of
    largest and smallest client values, average the rest.

    Returns:
        The algorithm; its states' ``aux`` is empty (``{}``, typed
        ``Mapping[str, torch.Tensor]``).
    """
    return compose(
        "trimmed-mean", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local, aggregate=Aggregate(aggregator=trimmed_mean(beta), clip_norm=clip_norm),
    )  # fmt: skip


def krum_fedavg(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    f: int = 1,
    m: int = 1,
    clip_norm: float | None = None,
) -> Algorithm[ClientData, Mapping[str, torch.Tensor]]:
    """Krum (Blanchard et al. 2017), or Multi-Krum with ``m > 1``, tolerating ``f`` Byzantine
    clients; needs ``clients_per_round > 2f + 2``.

    Returns:
        The algorithm; its states' ``aux`` is empty (``{}``, typed
        ``Mapping[str, torch.Tensor]``).

    Raises:
        ValueError: ``clients_per_round <= 2f + 2`` (checked here, not in the first round).
    """
    if clients_per_round <= 2 * f + 2:
        raise ValueError(
            f"krum with f={f} needs more than 2f+2={2 * f + 2} clients per round, "
            f"got {clients_per_round}"
        )
    return compose(
        "krum", model_fn, num_clients=num_clients, clients_per_round=clients_per_round,
        local=local, aggregate=Aggregate(aggregator=krum(f, m), clip_norm=clip_norm),
    )  # fmt: skip
