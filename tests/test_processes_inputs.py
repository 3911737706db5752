"""Per-client messages and stored state through every executor, Processes' shared memory most.

`ClientTask.message` / `ClientTask.state` travel to a `Processes` worker through the shared
input buffer, and `Uplink.state` comes back through the result slots (or pickled, when it does
not fit). Every executor must hand the client update the same tensors and return the same
uplinks; `RoundReport` counts messages in ``bytes_down`` and never counts stored state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import _inputs_helpers as helpers
import attrs
import pytest
import torch

from blazefl_fn import tree
from blazefl_fn.algorithms.stages import broadcast_params
from blazefl_fn.executors import Executor, Processes, Sequential, Threads
from blazefl_fn.executors.jobs import ClientUpdate
from blazefl_fn.keys import Key
from blazefl_fn.records import ClientInput, RoundReport, ServerState, Uplink
from blazefl_fn.round import Algorithm, make_round, run_round

NUM_CLIENTS = 6
CLIENTS = [10 * (i + 1) for i in range(NUM_CLIENTS)]
W_SIZE = 5  # float32 entries in the common downlink
ROUNDS = 3


def _inputs(round_index: int, cid: int) -> ClientInput:
    """Client ``cid``'s input in a round: sizes depend on the client only, values on both.

    Client 0 gets nothing (no input buffer layout at all), client 1 only empty tensors (a
    layout of 0 bytes); the others get mixed dtypes, a 0-d tensor, a non-contiguous tensor, an
    empty tensor and, for client 5, a uint8 entry at 255 so that ``+ 1`` wraps.
    """
    if cid == 0:
        return ClientInput()
    if cid == 1:
        return ClientInput(
            message={"e": torch.empty(0)}, state={"z": torch.zeros(0, dtype=torch.int64)}
        )
    g = torch.Generator().manual_seed(1000 * round_index + cid)
    message = {
        "f": torch.randn(3 * cid, generator=g),
        "i": torch.randint(-1000, 1000, (cid, 2), generator=g),
        "k": torch.tensor(cid + 100 * round_index),
        "e": torch.empty(0),
    }
    uint8 = torch.randint(0, 255, (7 * cid + 1,), generator=g, dtype=torch.uint8)
    if cid == 5:
        uint8[0] = 255
    state = {
        "u": uint8,
        "t": torch.randn(cid, 3, generator=g).t(),  # (3, cid), not contiguous
        "b": torch.rand(cid, generator=g) > 0.5,
        "z": torch.zeros(0, dtype=torch.int64),
    }
    return ClientInput(message=message, state=state)


def _empty_inputs(round_index: int, cid: int) -> ClientInput:
    """Only empty tensors for everyone: nothing is written to the input buffer."""
    del round_index
    return ClientInput(message={"e": torch.empty(0, cid)}, state={"z": torch.zeros(cid, 0)})


def _bytes(params: tree.Params) -> int:
    """numel x element size, summed; computed here rather than with `tree.nbytes`."""
    total = 0
    for tensor in params.values():
        numel = 1
        for dim in tensor.shape:
            numel *= dim
        total += numel * torch.empty((), dtype=tensor.dtype).element_size()
    return total


def _algorithm(
    update: ClientUpdate[int],
    inputs: Callable[[int, int], ClientInput] = _inputs,
    seen: list[tuple[int, ...]] | None = None,
) -> Algorithm[int]:
    def dispatch(state: ServerState, ids: Sequence[int]) -> list[ClientInput]:
        if seen is not None:
            seen.append(tuple(ids))
        return [inputs(state.round, cid) for cid in ids]

    def aggregate(state: ServerState, uplinks: Sequence[Uplink]) -> ServerState:
        # Keep the uplinks, so the tests can look at what came back.
        w = state.params["w"] + 1.0
        return attrs.evolve(state, params={"w": w}, round=state.round + 1, aux=tuple(uplinks))

    return Algorithm(
        name="inputs",
        init=lambda key: ServerState(
            params={"w": torch.randn(W_SIZE, generator=key.torch_generator())}
        ),
        # Every client, in a key-dependent order: run_round must sort them.
        sample=lambda _state, key: key.choice(NUM_CLIENTS, NUM_CLIENTS),
        broadcast=broadcast_params,
        client_update=update,
        aggregate=aggregate,
        dispatch=dispatch,
    )


Run = list[tuple[ServerState, ServerState, RoundReport]]


def _run(
    executor: Executor,
    update: ClientUpdate[int] = helpers.echo_update,
    inputs: Callable[[int, int], ClientInput] = _inputs,
    rounds: int = ROUNDS,
    seen: list[tuple[int, ...]] | None = None,
) -> Run:
    """``(state before, state after, report)`` for each round."""
    algo = _algorithm(update, inputs, seen)
    round_fn = make_round(algo, CLIENTS, executor)
    state = algo.init(Key.from_seed(0))
    out: Run = []
    for r in range(rounds):
        new_state, report = round_fn(state, Key.from_seed(7).fold_in(r))
        out.append((state, new_state, report))
        state = new_state
    return out


def _uplinks(state: ServerState) -> tuple[Uplink, ...]:
    uplinks = state.aux
    assert isinstance(uplinks, tuple)
    return uplinks  # pyright: ignore[reportUnknownVariableType]


def _fingerprint(run: Run) -> list[object]:
    """Everything a round produced except its wall-clock time, uplinks as digests."""
    out: list[object] = []
    for _, after, report in run:
        out.append(attrs.evolve(report, seconds=0.0))
        out.append(tree.digest(after.params))
        for u in _uplinks(after):
            digests = (tree.digest(u.params), tree.digest(u.state))
            out.append((u.client_id, u.num_examples, dict(u.metrics), *digests))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.fixture(scope="module")
def pool() -> Iterator[Processes]:
    with Processes(2) as executor:
        yield executor


@pytest.fixture(params=["sequential", "threads", "processes"])
def executor(request: pytest.FixtureRequest, pool: Processes) -> Iterator[Executor]:
    if request.param == "processes":
        yield pool
    elif request.param == "threads":
        with Threads(2) as threads:
            yield threads
    else:
        yield Sequential()


# -- what the client update sees and returns -----------------------------------------------


def test_messages_and_states_reach_the_update_and_come_back(executor: Executor) -> None:
    seen: list[tuple[int, ...]] = []
    run = _run(executor, seen=seen)
    assert seen == [tuple(range(NUM_CLIENTS))] * ROUNDS  # dispatch gets ascending ids
    for before, after, report in run:
        r = before.round
        uplinks = _uplinks(after)
        assert [u.client_id for u in uplinks] == list(range(NUM_CLIENTS))
        for u in uplinks:
            given = _inputs(r, u.client_id)
            expected_params = {f"up.{n}": helpers.doubled(t) for n, t in given.message.items()}
            expected_params["w"] = before.params["w"] + CLIENTS[u.client_id]
            assert list(u.params) == list(expected_params)
            assert all(_same(u.params[n], t) for n, t in expected_params.items())
            expected_state = {n: helpers.bumped(t) for n, t in given.state.items()}
            assert list(u.state) == list(expected_state)
            assert all(_same(u.state[n], t) for n, t in expected_state.items())
            assert u.num_examples == 1 + u.client_id
            assert u.metrics == {"loss": float(CLIENTS[u.client_id])}
        if r == 0:
            assert uplinks[5].state["u"][0] == 0  # 255 + 1 wrapped, as in the update

        messages = sum(_bytes(_inputs(r, c).message) for c in range(NUM_CLIENTS))
        assert messages > 0
        assert report.bytes_down == 4 * W_SIZE * NUM_CLIENTS + messages
        up = sum(_bytes(u.params) for u in uplinks)
        state_bytes = sum(_bytes(u.state) for u in uplinks)
        assert state_bytes > 0
        assert report.bytes_up == up  # stored state is not communication
        assert report.clients == tuple(range(NUM_CLIENTS))
        assert report.num_examples == sum(1 + c for c in range(NUM_CLIENTS))


def test_every_executor_returns_the_same_uplinks_and_reports(pool: Processes) -> None:
    reference = _fingerprint(_run(Sequential()))
    with Threads(2) as threads:
        assert _fingerprint(_run(threads)) == reference
    assert _fingerprint(_run(pool)) == reference


def test_inputs_of_only_empty_tensors(executor: Executor) -> None:
    run = _run(executor, inputs=_empty_inputs, rounds=1)
    _, after, report = run[0]
    for u in _uplinks(after):
        assert _same(u.params["up.e"], torch.empty(0, u.client_id))
        assert _same(u.state["z"], torch.ones(u.client_id, 0))
    assert report.bytes_down == 4 * W_SIZE * NUM_CLIENTS
    assert report.bytes_up == 4 * W_SIZE * NUM_CLIENTS
    assert _fingerprint(run) == _fingerprint(_run(Sequential(), inputs=_empty_inputs, rounds=1))


# -- uplinks larger than their slot ----------------------------------------------------------


def _check_grown(before: ServerState, after: ServerState) -> None:
    """The uplinks of `grow_update`: message and state passed through, plus the big entry."""
    r = before.round
    for u in _uplinks(after):
        given = _inputs(r, u.client_id)
        assert list(u.params) == [*given.message, "w"]
        assert all(_same(u.params[n], t) for n, t in given.message.items())
        assert _same(u.params["w"], before.params["w"] + CLIENTS[u.client_id])
        assert list(u.state) == [*given.state, "grown"]
        assert all(_same(u.state[n], t) for n, t in given.state.items())
        start = float(u.client_id * helpers.GROWN)
        grown = torch.arange(start, start + helpers.GROWN, dtype=torch.float32)
        assert _same(u.state["grown"], grown)


def test_an_uplink_larger_than_its_slot_arrives_intact_and_grows_the_slots(
    pool: Processes,
) -> None:
    grown_bytes = 4 * helpers.GROWN
    # The scenario needs the first map's uplinks not to fit their slots (a private detail,
    # checked so that the test cannot silently stop covering the pickled path).
    assert pool._result_bytes < grown_bytes  # pyright: ignore[reportPrivateUsage]
    run = _run(pool, update=helpers.grow_update, rounds=3)
    for before, after, _ in run:
        _check_grown(before, after)
    # Later maps had slots big enough for these uplinks.
    assert pool._result_bytes >= grown_bytes  # pyright: ignore[reportPrivateUsage]
    slots = pool._buffers["slots"]  # pyright: ignore[reportPrivateUsage]
    in_flight = pool._slot_count(NUM_CLIENTS)  # pyright: ignore[reportPrivateUsage]
    assert slots.numel() >= in_flight * grown_bytes
    assert _fingerprint(run) == _fingerprint(_run(Sequential(), update=helpers.grow_update))


def test_results_do_not_alias_shared_inputs_or_slots(pool: Processes) -> None:
    # Pass-through uplinks are views of the shared input buffer inside the worker; what the
    # caller gets must be its own. Every round writes new inputs of the same sizes.
    algo = _algorithm(helpers.grow_update)
    round_fn = make_round(algo, CLIENTS, pool)
    state = algo.init(Key.from_seed(0))
    first, _ = round_fn(state, Key.from_seed(1))
    kept = [(tree.digest(u.params), tree.digest(u.state)) for u in _uplinks(first)]
    second, _ = round_fn(first, Key.from_seed(2))
    round_fn(second, Key.from_seed(3))
    assert [(tree.digest(u.params), tree.digest(u.state)) for u in _uplinks(first)] == kept
    _check_grown(state, first)
    _check_grown(first, second)


# -- dispatch errors -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [NUM_CLIENTS - 1, NUM_CLIENTS + 1, 0])
def test_dispatch_must_give_one_input_per_sampled_client(pool: Processes, count: int) -> None:
    algo = attrs.evolve(
        _algorithm(helpers.echo_update),
        dispatch=lambda _state, _ids: [ClientInput()] * count,
    )
    state = algo.init(Key.from_seed(0))
    match = f"inputs: dispatch returned {count} client inputs for {NUM_CLIENTS} sampled clients"
    for executor in (Sequential(), pool):
        with pytest.raises(ValueError, match=match):
            run_round(algo, CLIENTS, executor, state, Key.from_seed(1))
