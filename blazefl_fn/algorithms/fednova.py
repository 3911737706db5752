"""FedNova (Wang et al. 2020): average normalised updates, so that clients taking more local
steps do not pull the model toward their own optimum.

Client ``i`` trains from ``x`` for ``tau_i`` steps (``epochs * ceil(n_i / batch_size)``, so
it grows with its data) to ``y_i`` with SGD, optionally with momentum ``rho``, and uploads
``y_i`` and ``tau_i`` (`Uplink.steps`). With ``p_i = n_i / sum(n)`` and the normaliser
``a_i = tau_i`` for SGD, or ``a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)`` with
momentum (the ``||a_i||_1`` of the paper), the server sets

    ``tau_eff = sum_i p_i a_i`` and ``x <- x - tau_eff * sum_i p_i (x - y_i) / a_i``.

With equal ``a_i`` this is FedAvg's weighted mean (up to float rounding). Buffers (BatchNorm
statistics) are averaged weighted by examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ..client.optim import momentum as momentum_stage
from ..client.training import LocalTraining, trainable_names
from ..data.datasets import ClientData
from ..models import ModelFactory, build_template
from ..records import ServerState, Uplink
from ..round import Algorithm
from ..server.sampling import uniform_sampler
from ..tree import add_weighted, select, sub
from ._stateful import merge_buffers
from .stages import ModelInit, TrainUpdate, broadcast_params

__all__ = ["fednova", "normalizer"]


def normalizer(steps: int, rho: float = 0.0) -> float:
    """FedNova's ``||a||_1`` for ``steps`` local steps of SGD with momentum ``rho``.

    Examples:
        >>> normalizer(5), round(normalizer(2, 0.5), 6)
        (5.0, 2.5)
    """
    if rho == 0.0:
        return float(steps)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


@attrs.frozen
class _Aggregate:
    rho: float
    names: tuple[str, ...]

    def __call__(self, state: ServerState, uplinks: Sequence[Uplink]) -> ServerState:
        used = [u for u in uplinks if u.num_examples > 0 and u.steps > 0]
        if not used:
            return attrs.evolve(state, round=state.round + 1)
        total = sum(u.num_examples for u in used)
        p = [u.num_examples / total for u in used]
        a = [normalizer(u.steps, self.rho) for u in used]
        tau_eff = sum(pi * ai for pi, ai in zip(p, a, strict=True))
        x = select(state.params, self.names)
        moved = [sub(select(u.params, self.names), x) for u in used]
        weights = [tau_eff * pi / ai for pi, ai in zip(p, a, strict=True)]
        stepped = add_weighted(x, moved, weights)
        params = merge_buffers(
            stepped, state.params, [u.params for u in used], [u.num_examples for u in used]
        )
        return attrs.evolve(state, params=params, round=state.round + 1)


def fednova(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    momentum: float = 0.0,
) -> Algorithm[ClientData]:
    """FedNova for local SGD with optional momentum ``rho = momentum``.

    Raises:
        ValueError: ``clients_per_round`` not in ``[1, num_clients]``, ``momentum`` not in
            ``[0, 1)``, or ``local`` has gradient hooks (their normaliser is not FedNova's).

    Examples:
        >>> import functools
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = fednova(functools.partial(logistic_regression, (60,), 10),
        ...                num_clients=30, clients_per_round=10, local=LocalTraining(),
        ...                momentum=0.9)
        >>> algo.name
        'fednova'
    """
    if local.optimizer is not None or local.loss_terms:
        raise ValueError(
            "fednova normalises SGD (with momentum); optimizer stages or loss terms in local "
            f"(optimizer={local.optimizer!r}, loss_terms={local.loss_terms!r}) change the "
            "normaliser, so they are not supported"
        )
    training = local
    if momentum != 0.0:
        training = attrs.evolve(training, optimizer=momentum_stage(momentum))
    template = build_template(model_fn)
    return Algorithm(
        name="fednova",
        init=ModelInit(model_fn),
        sample=uniform_sampler(num_clients, clients_per_round),
        broadcast=broadcast_params,
        client_update=TrainUpdate(template, training),
        aggregate=_Aggregate(momentum, trainable_names(template, aliases=True)),
    )
