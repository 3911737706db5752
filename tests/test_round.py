"""The round machinery on a toy algorithm: keys, order, purity, errors."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pytest
import torch

from blazefl_fn import tree
from blazefl_fn.algorithms.stages import broadcast_params, mean_by_examples
from blazefl_fn.errors import ClientError
from blazefl_fn.executors import Executor, Sequential
from blazefl_fn.keys import Key
from blazefl_fn.records import ClientTask, Downlink, ServerState, Uplink
from blazefl_fn.round import Algorithm, make_round, run_round
from blazefl_fn.run.simulate import run_rounds
from blazefl_fn.server.sampling import uniform_sampler

NUM_CLIENTS = 12


def _noisy_update(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    """Adds key-driven noise scaled by the client's datum; records the task in its metrics."""
    noise = torch.randn(3, generator=task.key.torch_generator())
    params = {"w": downlink.params["w"] + data * noise}
    metrics = {"loss": float(data), "round": float(task.round)}
    return Uplink(
        client_id=task.client_id, num_examples=task.client_id + 1, params=params, metrics=metrics
    )


def _toy(sample_size: int = 4) -> Algorithm[float]:
    return Algorithm(
        name="toy",
        init=lambda key: ServerState(params={"w": torch.randn(3, generator=key.torch_generator())}),
        sample=uniform_sampler(NUM_CLIENTS, sample_size),
        broadcast=broadcast_params,
        client_update=_noisy_update,
        aggregate=mean_by_examples,
    )


CLIENTS = [float(i) / 4 for i in range(NUM_CLIENTS)]


class _Reversed(Sequential):
    """Runs tasks in reverse order but returns results in task order, as executors must."""

    def map(self, fn, tasks):  # type: ignore[no-untyped-def]
        results = {i: fn(t) for i, t in reversed(list(enumerate(tasks)))}
        return [results[i] for i in range(len(tasks))]


def test_sequential_satisfies_the_protocol() -> None:
    assert isinstance(Sequential(), Executor)


def test_round_uses_the_key_convention() -> None:
    algo = _toy()
    state = algo.init(Key.from_seed(0))
    round_key = Key.from_seed(1).fold_in(0)
    new_state, report = run_round(algo, CLIENTS, Sequential(), state, round_key)
    expected_ids = tuple(sorted(round_key.fold_in("sample").choice(NUM_CLIENTS, 4)))
    assert report.clients == expected_ids
    uplinks = [
        _noisy_update(Downlink(0, state.params), CLIENTS[c], ClientTask(c, 0, round_key.fold_in(c)))
        for c in expected_ids
    ]
    expected = mean_by_examples(state, uplinks)
    assert tree.digest(new_state.params) == tree.digest(expected.params)
    assert new_state.round == 1
    assert report.round == 0
    assert report.num_examples == sum(c + 1 for c in expected_ids)
    assert report.bytes_down == report.bytes_up == 4 * 3 * 4


def test_client_key_does_not_depend_on_who_else_is_sampled() -> None:
    round_key = Key.from_seed(5)
    seen: dict[int, Key] = {}

    def record(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
        if task.client_id in seen:
            assert seen[task.client_id] == task.key
        seen[task.client_id] = task.key
        return _noisy_update(downlink, data, task)

    for size in (1, 5, NUM_CLIENTS):
        algo = attrs.evolve(_toy(size), client_update=record)
        run_round(algo, CLIENTS, Sequential(), algo.init(Key.from_seed(0)), round_key)
    assert all(seen[c] == round_key.fold_in(c) for c in seen)


def test_results_do_not_depend_on_completion_order() -> None:
    algo = _toy(NUM_CLIENTS)
    state = algo.init(Key.from_seed(0))
    a, _ = run_round(algo, CLIENTS, Sequential(), state, Key.from_seed(2))
    b, _ = run_round(algo, CLIENTS, _Reversed(), state, Key.from_seed(2))
    assert tree.digest(a.params) == tree.digest(b.params)


def test_round_does_not_mutate_its_inputs() -> None:
    algo = _toy()
    state = algo.init(Key.from_seed(0))
    before = tree.digest(state.params)
    tensor = state.params["w"]
    new_state, _ = make_round(algo, CLIENTS, Sequential())(state, Key.from_seed(3))
    assert tree.digest(state.params) == before
    assert state.round == 0
    assert new_state.params["w"] is not tensor


def test_train_metrics_are_weighted_by_examples() -> None:
    algo = _toy()
    _, report = run_round(
        algo, CLIENTS, Sequential(), algo.init(Key.from_seed(0)), Key.from_seed(4)
    )
    weights = [c + 1 for c in report.clients]
    expected = sum(CLIENTS[c] * w for c, w in zip(report.clients, weights, strict=True))
    assert report.train_metrics["loss"] == pytest.approx(expected / sum(weights))


def test_resumed_rounds_equal_an_uninterrupted_run() -> None:
    algo = _toy()
    round_fn = make_round(algo, CLIENTS, Sequential())
    run_key = Key.from_seed(9)
    start = algo.init(Key.from_seed(0))
    whole, reports = run_rounds(round_fn, start, run_key, until=4)
    half, _ = run_rounds(round_fn, start, run_key, until=2)
    resumed, later = run_rounds(round_fn, half, run_key, until=4)  # up to 4 rounds in all
    assert tree.digest(whole.params) == tree.digest(resumed.params)
    assert [r.round for r in reports] == [0, 1, 2, 3]
    assert [r.clients for r in reports[2:]] == [r.clients for r in later]


def test_client_exception_names_client_and_round() -> None:
    def failing(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
        if task.client_id == 7:
            raise ZeroDivisionError("boom")
        return _noisy_update(downlink, data, task)

    algo = attrs.evolve(_toy(NUM_CLIENTS), client_update=failing)
    state = attrs.evolve(algo.init(Key.from_seed(0)), round=3)
    with pytest.raises(
        ClientError, match="client 7 failed in round 4: ZeroDivisionError: boom"
    ) as info:
        run_round(algo, CLIENTS, Sequential(), state, Key.from_seed(0))
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert (info.value.client_id, info.value.round_index) == (7, 3)


def test_uplink_for_the_wrong_client_is_refused() -> None:
    def liar(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
        return attrs.evolve(_noisy_update(downlink, data, task), client_id=0)

    algo = attrs.evolve(_toy(NUM_CLIENTS), client_update=liar)
    with pytest.raises(ClientError, match=r"client 1 failed in round 1: .*names client 0"):
        run_round(algo, CLIENTS, Sequential(), algo.init(Key.from_seed(0)), Key.from_seed(0))


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ((), "no clients"),
        ((1, 1), "duplicate client ids"),
        ((0, NUM_CLIENTS), r"must be in \[0, 12\)"),
        ((-1,), r"must be in \[0, 12\)"),
    ],
)
def test_bad_samplers_are_refused(ids: Sequence[int], match: str) -> None:
    algo = attrs.evolve(_toy(), sample=lambda state, key: ids)
    with pytest.raises(ValueError, match=match):
        run_round(algo, CLIENTS, Sequential(), algo.init(Key.from_seed(0)), Key.from_seed(0))


@pytest.mark.parametrize(
    ("n", "k", "match"),
    [
        (0, 1, "num_clients must be >= 1, got 0"),
        (5, 6, r"in \[1, num_clients=5\], got 6"),
        (5, 0, "got 0"),
    ],
)
def test_uniform_sampler_refuses_impossible_sizes(n: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uniform_sampler(n, k)


def test_sequential_map_keeps_order_and_closes() -> None:
    with Sequential() as executor:
        assert executor.map(lambda x: -x, [3, 1, 2]) == [-3, -1, -2]
    executor.close()  # idempotent
