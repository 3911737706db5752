"""SCAFFOLD (Karimireddy et al. 2020): local SGD corrected by control variates.

Round ``t``, with ``x`` the global model, ``c`` the server's control variate and ``c_i``
client ``i``'s (zero before it first takes part), ``K`` its local steps and ``lr`` the local
step size:

1. the server sends ``x`` and ``c`` (twice FedAvg's downlink);
2. client ``i`` trains from ``x`` along ``g + c - c_i`` (`corrected`: the `add_trees` stage in
   front of the local optimizer) to ``y_i``, and sets (option II)
   ``c_i+ = c_i - c + (x - y_i) / (K * lr)``; it uploads ``y_i`` and ``c_i+ - c_i`` and keeps
   ``c_i+`` (`blazefl_fn.server.client_state`);
3. the server steps ``x <- x + server_lr * mean_i(y_i - x)`` and
   ``c <- c + (1 / num_clients) * sum_i(c_i+ - c_i)`` (both means are uniform over the sampled
   clients, as in the paper's Algorithm 1).

Variates cover the trainable parameters; buffers (BatchNorm statistics) are averaged weighted by
examples. Under full participation ``c`` stays the mean of the clients' ``c_i``. A sampled
client without data counts in the means with ``y_i = x`` and no change of ``c_i``. Option II's
``(x - y_i) / (K * lr)`` is the mean step direction of plain SGD; with optimizer stages in
``local`` (e.g. a proximal term) it is the mean of the staged directions instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from .._validators import finite_number
from ..client.optim import add_trees, chain
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
from ..tree import Params, add_weighted, from_module, pack, select, sub, unpack
from ._stateful import merge_buffers, zeros_like

__all__ = [
    "ScaffoldState",
    "ScaffoldUpdate",
    "corrected",
    "scaffold",
    "scaffold_broadcast",
    "scaffold_dispatch",
]


@attrs.frozen(eq=False)
class ScaffoldState:
    """SCAFFOLD's server state (``ServerState.aux``).

    Attributes:
        c: the server control variate, over the trainable parameters.
        clients: each client's control variate ``c_i`` (empty: not yet taken part, i.e. zero).
    """

    c: Params
    clients: ClientStates


@attrs.frozen
class _Init:
    model_fn: ModelFactory
    num_clients: int
    names: tuple[str, ...]
    store: StoreOptions | None = None

    def __call__(self, key: Key) -> ServerState[ScaffoldState]:
        params = from_module(build_module(self.model_fn, key))
        c = zeros_like(select(params, self.names))
        # Each c_i is laid out as c: a checkpoint with anything else is refused at load.
        clients = initial_states(self.num_clients, self.store, StateLayout.of(c))
        return ServerState(params, aux=ScaffoldState(c, clients))


def scaffold_broadcast(state: ServerState[ScaffoldState]) -> Downlink:
    """The model and the server variate, packed as ``"model/..."`` and ``"c/..."``."""
    return Downlink(round=state.round, params=pack({"model": state.params, "c": state.aux.c}))


def scaffold_dispatch(state: ServerState[ScaffoldState], ids: Sequence[int]) -> list[ClientInput]:
    """Each sampled client's own variate ``c_i`` as its stored state."""
    return dispatch_states(state.aux.clients, ids)


def corrected(training: LocalTraining) -> LocalTraining:
    """``training`` stepping along ``g + c - c_i`` (then through its own optimizer, if any).

    Examples:
        >>> corrected(LocalTraining()).optimizer is not None
        True
    """
    correction = add_trees(plus=("c",), minus=("c_i",))
    optimizer = correction if training.optimizer is None else chain(correction, training.optimizer)
    return attrs.evolve(training, optimizer=optimizer)


@attrs.frozen
class ScaffoldUpdate:
    """SCAFFOLD's client stage: corrected local training, then the option-II variate update.

    Attributes:
        template: the model.
        training: local training, already `corrected` (it reads the trees ``"c"`` and
            ``"c_i"``).
    """

    template: torch.nn.Module
    training: LocalTraining

    def __call__(self, downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
        """Train from the downlink's model; upload ``y_i`` and ``c_i+ - c_i``, keep ``c_i+``."""
        x = unpack(downlink.params, "model")
        c = unpack(downlink.params, "c")
        c_i: Params = task.state if task.state else zeros_like(c)
        trained = train(self.template, x, data, task.key, self.training, trees={"c": c, "c_i": c_i})
        y, steps = trained.params, trained.result.steps
        if steps == 0:
            c_new = dict(c_i)
        else:
            span = steps * self.training.lr
            c_new = {n: c_i[n] - c[n] + (x[n] - y[n]) / span for n in c}
        return Uplink(
            client_id=task.client_id,
            num_examples=len(data),
            params=pack({"model": y, "c_delta": sub(c_new, c_i)}),
            metrics={"loss": trained.result.loss},
            state=c_new,
            steps=steps,
        )


@attrs.frozen
class _Aggregate:
    num_clients: int
    server_lr: float = attrs.field(validator=finite_number(positive=True))
    names: tuple[str, ...]

    def __call__(
        self, state: ServerState[ScaffoldState], uplinks: Sequence[Uplink]
    ) -> ServerState[ScaffoldState]:
        models = [unpack(u.params, "model") for u in uplinks]
        x = select(state.params, self.names)
        deltas = [sub(select(m, self.names), x) for m in models]
        m = len(uplinks)
        stepped = add_weighted(x, deltas, [self.server_lr / m] * m)
        params = merge_buffers(stepped, state.params, models, [u.num_examples for u in uplinks])
        c_deltas = [unpack(u.params, "c_delta") for u in uplinks]
        c = add_weighted(state.aux.c, c_deltas, [1.0 / self.num_clients] * m)
        clients = collect_states(state.aux.clients, uplinks)
        return ServerState(params, state.round + 1, ScaffoldState(c, clients))


def scaffold(
    model_fn: ModelFactory,
    *,
    num_clients: int,
    clients_per_round: int,
    local: LocalTraining,
    server_lr: float = 1.0,
    store: StoreOptions | None = None,
) -> Algorithm[ClientData, ScaffoldState]:
    """SCAFFOLD with option-II control variates and global step size ``server_lr``.

    ``store`` sets the memory budget of the clients' stored state (`StoreOptions`; by
    default 1 GiB in memory, the rest spilled to files): only clients that took part hold any.

    Raises:
        ValueError: ``clients_per_round`` not in ``[1, num_clients]``, or a bad ``server_lr``.

    Examples:
        >>> import functools
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = scaffold(functools.partial(logistic_regression, (60,), 10),
        ...                 num_clients=30, clients_per_round=10, local=LocalTraining())
        >>> state = algo.init(Key.from_seed(0))
        >>> sorted(state.aux.c), state.aux.clients.num_stored
        (['1.bias', '1.weight'], 0)
    """
    initial_states(num_clients, store)  # checks the store options now, not at init
    template = build_template(model_fn)
    names = trainable_names(template, aliases=True)
    return Algorithm(
        name="scaffold",
        init=_Init(model_fn, num_clients, names, store),
        sample=uniform_sampler(num_clients, clients_per_round),
        broadcast=scaffold_broadcast,
        client_update=ScaffoldUpdate(template, corrected(local)),
        aggregate=_Aggregate(num_clients, server_lr, names),
        dispatch=scaffold_dispatch,
    )
