"""FedDyn (Acar et al. 2021): a dynamic regulariser that aligns local and global optima.

Round ``t``, with ``theta`` the global model, ``alpha`` the regulariser weight and ``g_k``
client ``k``'s gradient state (zero before it first takes part):

1. client ``k`` minimises ``L_k(w) - <g_k, w> + alpha/2 ||w - theta||^2`` (`dynamic`: the
   `InnerProduct` and quadratic loss terms) to ``theta_k``, sets
   ``g_k <- g_k - alpha * (theta_k - theta)`` and keeps it; it uploads ``theta_k``;
2. the server sets ``h <- h - (alpha / num_clients) * sum_k(theta_k - theta)`` and
   ``theta <- mean_k(theta_k) - h / alpha`` (uniform means over the sampled clients, as in the
   paper's Algorithm 1).

A sampled client without data counts in the mean with ``theta_k = theta``. ``h`` stays the
mean of every client's ``g_k`` over the whole federation (clients that never
took part count as zero). The state covers the trainable parameters; buffers (BatchNorm
statistics) are averaged weighted by examples.

**One alpha for every client**, as the paper's Algorithm 1 states and its analysis assumes.
The authors' code (``utils_methods.py`` in alpemreacar/FedDyn) scales it per client instead,
``alpha_k = alpha * mean(n) / n_k`` with ``n_k`` client ``k``'s examples and ``mean(n)`` the
mean over the whole federation: clients with more data are pulled less towards ``theta``.
The two agree when clients hold equal amounts of data and differ otherwise, so results
reproduced from that code need equal client sizes (or their alpha rescaled). We keep the
paper's rule: it is the algorithm the paper proves things about, and it needs no statistic of
the whole federation, which a lazy federation of a million clients would have to build every
client to compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from .._validators import finite_number
from ..client.optim import InnerProduct, StepInput
from ..client.training import LocalTraining, train, trainable_names
from ..data.datasets import ClientData
from ..keys import Key
from ..models import ModelFactory, build_module, build_template
from ..records import ClientInput, ClientTask, Downlink, ServerState, Uplink
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
from ..tree import Params, add_weighted, from_module, select, sub, weighted_mean
from ._stateful import merge_buffers, zeros_like
from .stages import broadcast_params

__all__ = ["FedDynState", "FedDynUpdate", "dynamic", "feddyn", "feddyn_dispatch"]


@attrs.frozen(eq=False)
class FedDynState:
    """FedDyn's server state (``ServerState.aux``).

    Attributes:
        h: the server's state ``h``, over the trainable parameters.
        clients: each client's gradient state ``g_k`` (empty: not yet taken part, i.e. zero).
    """

    h: Params
    clients: ClientStates


@attrs.frozen
class _Init:
    model_fn: ModelFactory
    num_clients: int
    names: tuple[str, ...]
    store: StoreOptions | None = None

    def __call__(self, key: Key) -> ServerState[FedDynState]:
        params = from_module(build_module(self.model_fn, key))
        h = zeros_like(select(params, self.names))
        # Each g_k is laid out as h: a checkpoint with anything else is refused at load.
        clients = initial_states(self.num_clients, self.store, StateLayout.of(h))
        return ServerState(params, aux=FedDynState(h, clients))


def feddyn_dispatch(state: ServerState[FedDynState], ids: Sequence[int]) -> list[ClientInput]:
    """Each sampled client's own ``g_k`` as its stored state."""
    return dispatch_states(state.aux.clients, ids)


def dynamic(training: LocalTraining, alpha: float) -> LocalTraining:
    """``training`` with FedDyn's loss terms ``-<g_k, w> + alpha/2 ||w - theta||^2`` added.

    The linear term reads the tree ``"grad"`` (``g_k``).

    Examples:
        >>> len(dynamic(LocalTraining(), 0.01).loss_terms)
        2
    """
    terms = (InnerProduct("grad", -1.0), _Quadratic(alpha))
    return attrs.evolve(training, loss_terms=(*training.loss_terms, *terms))


@attrs.frozen
class _Quadratic:
    """``alpha/2 * ||w - anchor||^2`` as a loss term: FedDyn's quadratic regulariser.

    FedProx's term is the `blazefl_fn.client.optim.add_proximal` stage, whose gradient is the
    same up to float rounding; FedDyn keeps the loss-term form its checkpoints' bits were
    written with (a run resumed across versions must continue on the same arithmetic).
    """

    alpha: float = attrs.field(validator=finite_number(positive=True))

    def __call__(self, params: Params, inputs: StepInput) -> torch.Tensor:
        total = sum((((p - inputs.anchor[n]) ** 2).sum() for n, p in params.items()))
        return torch.as_tensor(total) * (self.alpha / 2)


@attrs.frozen
class FedDynUpdate:
    """FedDyn's client stage: regularised local training, then the ``g_k`` update.

    Attributes:
        template: the model.
        training: local training with the `dynamic` loss terms.
        alpha: the regulariser weight (the same as in the loss terms).
        names: the trainable parameters (with tied aliases) ``g_k`` covers.
    """

    template: torch.nn.Module
    training: LocalTraining
    alpha: float = attrs.field(validator=finite_number(positive=True))
    names: tuple[str, ...]

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        """Train from the downlink; upload the model, keep ``g_k - alpha (theta_k - theta)``."""
        theta = select(downlink.params, self.names)
        g: Params = task.state if task.state else zeros_like(theta)
        trained = train(self.template, downlink.params, data, task.key, self.training,
                        trees={"grad": g})  # fmt: skip
        moved = sub(select(trained.params, self.names), theta)
        return Uplink(
            client_id=task.client_id,
            num_examples=len(data),
            params=trained.params,
            metrics={"loss": trained.result.loss},
            state=add_weighted(g, [moved], [-self.alpha]),
            steps=trained.result.steps,
        )


@attrs.frozen
class _Aggregate:
    num_clients: int
    alpha: float
    names: tuple[str, ...]

    def __call__(
        self, state: ServerState[FedDynState], uplinks: Sequence[Uplink]
    ) -> ServerState[FedDynState]:
        theta = select(state.params, self.names)
        models = [select(u.params, self.names) for u in uplinks]
        moved = [sub(m, theta) for m in models]
        h = add_weighted(state.aux.h, moved, [-self.alpha / self.num_clients] * len(moved))
        mean = weighted_mean(models, [1] * len(models))
        stepped = add_weighted(mean, [h], [-1.0 / self.alpha])
        full = [u.params for u in uplinks]
        params = merge_buffers(stepped, state.params, full, [u.num_examples for u in uplinks])
        clients = collect_states(state.aux.clients, uplinks)
        return ServerState(params, state.round + 1, FedDynState(h, clients))


def feddyn(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    alpha: float = 0.01,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData, FedDynState]:
    """FedDyn with regulariser weight ``alpha``.

    ``store`` sets the memory budget of the clients' stored state (`StoreOptions`; by
    default 1 GiB in memory, the rest spilled to files): only clients that took part hold any.

    Raises:
        ValueError: ``clients_per_round`` not in ``[1, num_clients]``, or ``alpha <= 0``.

    Examples:
        >>> import functools
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = feddyn(functools.partial(logistic_regression, (60,), 10),
        ...               num_clients=30, clients_per_round=10, local=LocalTraining())
        >>> sorted(algo.init(Key.from_seed(0)).aux.h)
        ['1.bias', '1.weight']
    """
    initial_states(num_clients, store)  # checks the store options now, not at init
    template = build_template(model_fn)
    names = trainable_names(template, aliases=True)
    training = dynamic(local, alpha)
    return Algorithm(
        name="feddyn",
        init=_Init(model_fn, num_clients, names, store),
        sample=uniform_sampler(num_clients, clients_per_round),
        broadcast=broadcast_params,
        client_update=FedDynUpdate(template, training, alpha, names),
        aggregate=_Aggregate(num_clients, alpha, names),
        dispatch=feddyn_dispatch,
    )
