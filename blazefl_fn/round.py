"""The round machinery: sample -> broadcast -> map(client update) -> aggregate.

A round is a pure function ``(state, round_key) -> (new_state, report)``: the new state depends
only on the state, the key, the algorithm and the client data, never on the executor or on the
order in which clients finish. Keys follow the tree convention

- ``round_key = run_key.fold_in(round_index)``,
- ``round_key.fold_in("sample")`` picks the clients,
- ``round_key.fold_in(client_id)`` is the client's key,

so a client's key depends neither on which other clients were sampled nor on the executor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, Protocol, cast, runtime_checkable

import attrs
import torch
from typing_extensions import TypeVar

from .errors import NonFiniteError
from .executors.base import Executor, Preparing, threads_of
from .executors.devices import cuda_determinism, to_device
from .executors.jobs import ClientContext, ClientJob, ClientUpdate
from .keys import Key
from .models import intra_op_threads
from .records import ClientInput, ClientTask, Downlink, RoundReport, ServerState, Uplink
from .server.client_state import ClientStore
from .server.sampling import Sampler
from .tree import all_finite, nbytes, nonfinite

__all__ = [
    "Algorithm",
    "KeyedAggregate",
    "RoundFn",
    "make_round",
    "nonfinite_leaves",
    "on_server",
    "run_round",
]

Data = TypeVar("Data")
# The algorithm's own server state (`ServerState.aux`). A bare ``Algorithm[Data]`` or
# ``RoundFn`` leaves it open (Any): it accepts an algorithm of any aux type, as it did before
# the parameter existed; annotate ``Algorithm[Data, MyAux]`` to have it checked.
A = TypeVar("A", default=Any)

RoundFn = Callable[[ServerState[A], Key], tuple[ServerState[A], RoundReport]]
"""One round as a pure function, ``(state, key) -> (next state, report)``; see `make_round`."""


Dispatch = Callable[[ServerState[A], Sequence[int]], Sequence[ClientInput]]


@runtime_checkable
class KeyedAggregate(Protocol[A]):
    """An aggregate stage that draws randomness (DP-FedAvg's noise): `run_round` calls
    ``with_key`` instead of ``__call__``, with the round's server key
    ``round_key.fold_in("aggregate")``."""

    def __call__(self, state: ServerState[A], uplinks: Sequence[Uplink]) -> ServerState[A]:
        """The next state; may refuse to run without a key."""
        ...

    def with_key(
        self, state: ServerState[A], uplinks: Sequence[Uplink], key: Key
    ) -> ServerState[A]:
        """The next state, drawing from ``key`` only."""
        ...


@attrs.frozen
class Algorithm(Generic[Data, A]):
    """An FL algorithm as pure stages; `run_round` wires them together.

    Generic in the clients' data type ``Data`` and in the server state's ``aux`` type ``A``
    (``Algorithm[ClientData, ScaffoldState]``), so that pyright checks each stage against the
    state the others make.

    Attributes:
        name: a short identifier, e.g. ``"fedavg"``.
        init: the initial server state, from a key.
        sample: the client ids taking part in a round, from the state and the sampling key;
            none only from a sampler with ``allows_empty = True`` (`PoissonSampler`).
        broadcast: the downlink every sampled client receives.
        client_update: one client's work, from the downlink, its data and its `ClientTask`
            (id, round, key); run by an executor, so it must touch nothing but its arguments.
        aggregate: the next state from the uplinks, given in ascending client-id order; a
            `KeyedAggregate` (one with ``with_key``) also gets the round's server key.
        dispatch: optional; each sampled client's own `ClientInput` (its message and stored
            state), given the ids in ascending order. Algorithms whose clients keep state
            between rounds (DS-FL's local models, SCARLET's caches) keep it in the server
            state's ``aux``, hand it out here and collect it from ``Uplink.state``
            (`blazefl_fn.server.client_state`). Without it, clients receive no message or state: a
            client that looks one up fails with `MissingStage`, and clients that return state
            fail the round, since nothing would keep it.
        allow_global_rng: let client updates draw from torch's global generator (e.g.
            ``nn.Dropout``): ``attrs.evolve(algorithm, allow_global_rng=True)``. Off by
            default: every executor then checks that a client left the global RNG untouched,
            because such draws differ between executors and runs.
        nonfinite: what a round does with a client whose uplink (``params`` or ``state``)
            holds a NaN or an infinity: ``"raise"`` (the default) fails the round with
            `NonFiniteError` naming the clients; ``"skip"`` leaves them out of the
            aggregate and lists them in `RoundReport.skipped` (the round still fails if every
            client is skipped). A non-finite server model after ``aggregate`` always fails.
    """

    name: str
    init: Callable[[Key], ServerState[A]]
    sample: Sampler
    broadcast: Callable[[ServerState[A]], Downlink]
    client_update: ClientUpdate[Data]
    aggregate: Callable[[ServerState[A], Sequence[Uplink]], ServerState[A]]
    dispatch: Dispatch[A] | None = None
    allow_global_rng: bool = False
    nonfinite: Literal["raise", "skip"] = attrs.field(
        default="raise", validator=attrs.validators.in_(("raise", "skip"))
    )


def _check_ids(
    ids: Sequence[int], num_clients: int, *, allow_empty: bool = False
) -> tuple[int, ...]:
    ordered = tuple(sorted(ids))
    if not ordered and allow_empty:
        return ordered
    if not ordered:
        raise ValueError("the sampler returned no clients")
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"the sampler returned duplicate client ids: {list(ids)}")
    if ordered[0] < 0 or ordered[-1] >= num_clients:
        raise ValueError(f"sampled client ids must be in [0, {num_clients}), got {list(ids)}")
    return ordered


def _mean_metrics(uplinks: Sequence[Uplink]) -> dict[str, float]:
    if not uplinks:
        return {}
    names = set(uplinks[0].metrics).intersection(*(u.metrics for u in uplinks[1:]))
    total = sum(u.num_examples for u in uplinks)
    out: dict[str, float] = {}
    for name in sorted(names):
        if total > 0:
            out[name] = sum(u.metrics[name] * u.num_examples for u in uplinks) / total
        else:
            out[name] = sum(u.metrics[name] for u in uplinks) / len(uplinks)
    return out


def _client_inputs(
    algorithm: Algorithm[Data, A], state: ServerState[A], ids: tuple[int, ...]
) -> Sequence[ClientInput]:
    if algorithm.dispatch is None:
        return [ClientInput()] * len(ids)
    inputs = algorithm.dispatch(state, ids)
    if len(inputs) != len(ids):
        raise ValueError(
            f"{algorithm.name}: dispatch returned {len(inputs)} client inputs "
            f"for {len(ids)} sampled clients"
        )
    return inputs


def _check_kept(algorithm: Algorithm[Data, A], uplinks: Sequence[Uplink], round_index: int) -> None:
    if algorithm.dispatch is not None:
        return
    stateful = [u.client_id for u in uplinks if u.state]
    if stateful:
        raise ValueError(
            f"{algorithm.name}: clients {stateful[:5]} returned stored state in round "
            f"{round_index + 1}, but the algorithm has no dispatch stage to keep it and hand it "
            "back; add one (Algorithm.dispatch, see blazefl_fn.server.client_state)"
        )


def _screen(
    algorithm: Algorithm[Data, A], uplinks: Sequence[Uplink], round_index: int
) -> tuple[Sequence[Uplink], tuple[int, ...]]:
    """The uplinks to aggregate and the clients left out for non-finite values."""
    # One pass over every uplink first; naming the culprits costs a check per tensor.
    if all_finite([*(u.params for u in uplinks), *(u.state for u in uplinks)]):
        return uplinks, ()
    bad: dict[int, list[str]] = {}
    for u in uplinks:
        names = nonfinite(u.params) + [f"state:{n}" for n in nonfinite(u.state)]
        if names:
            bad[u.client_id] = names
    if not bad:
        return uplinks, ()
    if algorithm.nonfinite == "raise" or len(bad) == len(uplinks):
        raise NonFiniteError(round_index, bad, skipping=algorithm.nonfinite == "skip")
    return [u for u in uplinks if u.client_id not in bad], tuple(sorted(bad))


def _context(algorithm: Algorithm[Data, A], clients: Sequence[Data]) -> ClientContext[Data]:
    return ClientContext(
        algorithm.client_update,
        clients,
        dispatched=algorithm.dispatch is not None,
        check_global_rng=not algorithm.allow_global_rng,
    )


def run_round(
    algorithm: Algorithm[Data, A],
    clients: Sequence[Data],
    executor: Executor,
    state: ServerState[A],
    key: Key,
) -> tuple[ServerState[A], RoundReport]:
    """Run round ``state.round`` with ``key`` (the round key) and return the next state.

    The whole round runs at the executor's intra-op thread count (`threads_of`, default 1;
    the caller's ``torch.set_num_threads`` is restored afterwards), so its bits are the same
    whatever the calling process had set.

    Raises:
        ClientError: a client's update raised (the first failing client in id order), or
            changed torch's global RNG state (`GlobalRNGError`).
        NonFiniteError: clients sent NaN or infinite values (see `Algorithm.nonfinite`), or
            the new server state (its parameters or its ``aux``, e.g. an optimizer's
            moments) has some.
        ValueError: the sampler returned duplicate or out-of-range ids, ``dispatch``
            returned a number of inputs other than the number of sampled clients, or
            clients returned stored state to an algorithm without ``dispatch``.
    """
    # A server on CUDA aggregates with deterministic kernels too (clients get them from the
    # executor); on the CPU this does nothing.
    cuda = any(t.is_cuda for t in state.params.values())
    with intra_op_threads(threads_of(executor)), cuda_determinism(cuda):
        start = time.perf_counter()
        ids = _check_ids(
            algorithm.sample(state, key.fold_in("sample")),
            len(clients),
            allow_empty=getattr(algorithm.sample, "allows_empty", False) is True,
        )
        downlink = algorithm.broadcast(state)
        inputs = _client_inputs(algorithm, state, ids)
        tasks = [
            ClientTask(cid, state.round, key.fold_in(cid), given.message, given.state)
            for cid, given in zip(ids, inputs, strict=True)
        ]
        job = ClientJob(_context(algorithm, clients), downlink)
        sent = executor.map(job, tasks) if tasks else []
        _check_kept(algorithm, sent, state.round)
        uplinks, skipped = _screen(algorithm, sent, state.round)
        aggregate = algorithm.aggregate
        if isinstance(aggregate, KeyedAggregate):
            keyed = cast(KeyedAggregate[A], aggregate)
            new_state = keyed.with_key(state, uplinks, key.fold_in("aggregate"))
        else:
            new_state = aggregate(state, uplinks)
        # The whole new server state: an infinite optimizer moment (FedAdam's v) leaves the
        # parameters finite for a while, and would be checkpointed.
        diverged = nonfinite(new_state.params) + nonfinite_leaves(new_state.aux)
        if diverged:
            raise NonFiniteError(state.round, server=diverged)
        report = RoundReport(
            round=state.round,
            clients=ids,
            num_examples=sum(u.num_examples for u in uplinks),
            train_metrics=_mean_metrics(uplinks),
            bytes_down=nbytes(downlink.params) * len(ids) + sum(nbytes(t.message) for t in tasks),
            bytes_up=sum(nbytes(u.params) for u in sent),
            seconds=time.perf_counter() - start,
            skipped=skipped,
        )
        return new_state, report


def on_server(algorithm: Algorithm[Data, A], device: torch.device) -> Algorithm[Data, A]:
    """``algorithm`` with its server stages' tensors on ``device`` (where the state lives).

    The server stages (``sample``, ``broadcast``, ``aggregate``, ``dispatch``) are placed with
    `blazefl_fn.executors.devices.to_device`; ``init`` is kept (place the state it makes), and so is
    ``client_update``, which the executor places on each client's device.

    Examples:
        >>> import functools, torch
        >>> from blazefl_fn.algorithms.fedavg import fedavg
        >>> from blazefl_fn.client.training import LocalSGD
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = fedavg(functools.partial(logistic_regression, (4,), 2),
        ...               num_clients=3, clients_per_round=2, local=LocalSGD())
        >>> on_server(algo, torch.device("cpu")) is algo
        True
    """
    memo: dict[int, object] = {}
    placed = {
        name: to_device(getattr(algorithm, name), device, memo)
        for name in ("sample", "broadcast", "aggregate", "dispatch")
    }
    if all(placed[name] is getattr(algorithm, name) for name in placed):
        return algorithm
    return attrs.evolve(algorithm, **placed)


def make_round(
    algorithm: Algorithm[Data, A], clients: Sequence[Data], executor: Executor
) -> RoundFn[A]:
    """The round of ``algorithm`` over ``clients`` as ``(state, key) -> (state, report)``.

    An executor with a ``prepare`` method (`Processes`) receives the clients' data here, once,
    so that the first round does not pay for moving it.
    """

    if isinstance(executor, Preparing):
        # Ship the clients' data before the first round rather than inside it.
        executor.prepare(_context(algorithm, clients))

    def round_fn(state: ServerState[A], key: Key) -> tuple[ServerState[A], RoundReport]:
        return run_round(algorithm, clients, executor, state, key)

    return round_fn


def nonfinite_leaves(obj: object, where: str = "aux") -> list[str]:
    """Where ``obj`` (a server's aux state) holds a NaN or an infinity, as `flatten` names
    places: floating-point tensors and floats, through mappings, sequences and attrs records.

    A `ClientStore` is not searched: what it holds came from uplinks, which rounds screen
    before storing. Other objects are not searched either (an aux state need only be
    checkpointable when checkpoints are written).

    Examples:
        >>> nonfinite_leaves({"m": torch.ones(2), "v": (torch.tensor([float("inf")]), 1.0)})
        ['aux.v[0]']
    """
    found: list[str] = []
    if isinstance(obj, torch.Tensor):
        floating = obj.is_floating_point() or obj.is_complex()
        if floating and not bool(torch.isfinite(obj).all()):
            found.append(where)
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            found.append(where)
    elif isinstance(obj, Mapping):
        mapping = cast(Mapping[object, object], obj)
        for name in sorted(mapping, key=str):
            found += nonfinite_leaves(mapping[name], f"{where}.{name}")
    elif isinstance(obj, tuple | list):
        items = cast(tuple[object, ...] | list[object], obj)
        for i, value in enumerate(items):
            found += nonfinite_leaves(value, f"{where}[{i}]")
    elif attrs.has(type(obj)) and not isinstance(obj, ClientStore):
        for field in attrs.fields(type(obj)):
            found += nonfinite_leaves(getattr(obj, field.name), f"{where}.{field.name}")
    return found
