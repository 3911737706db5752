"""Divergence is caught where it appears: a client's NaN/Inf uplink or a non-finite server model
fails the round with the clients and round named, or the clients are skipped on request."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import cast

import _executor_helpers as helpers
import attrs
import pytest
import torch

from blazefl_fn import tree
from blazefl_fn.algorithms.compose import fedadam
from blazefl_fn.algorithms.stages import broadcast_params, mean_by_examples
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.data import ClientData, synthetic
from blazefl_fn.errors import NonFiniteError
from blazefl_fn.executors import Executor, Processes, Sequential, Threads
from blazefl_fn.executors.jobs import ClientUpdate
from blazefl_fn.keys import Key
from blazefl_fn.models import logistic_regression
from blazefl_fn.records import ClientInput, ClientTask, Downlink, RoundReport, ServerState, Uplink
from blazefl_fn.round import Algorithm, make_round, nonfinite_leaves
from blazefl_fn.server.sampling import uniform_sampler

CLIENTS = [0.5 * i for i in range(6)]


def _algorithm(update: ClientUpdate[float], **kwargs: object) -> Algorithm[float]:
    return Algorithm(
        name="toy",
        init=lambda key: ServerState(params={"w": torch.zeros(4), "n": torch.tensor(0)}),
        sample=uniform_sampler(len(CLIENTS), len(CLIENTS)),
        broadcast=broadcast_params,
        client_update=update,
        aggregate=mean_by_examples,
        **kwargs,
    )


def _round(
    algorithm: Algorithm[float], executor: Executor | None = None
) -> tuple[ServerState, RoundReport]:
    with executor if executor is not None else Sequential() as ex:
        round_fn = make_round(algorithm, CLIENTS, ex)
        return round_fn(algorithm.init(Key.from_seed(0)), Key.from_seed(1))


def test_tree_nonfinite_names_float_entries_with_nan_or_inf() -> None:
    params = {
        "a": torch.tensor([1.0, float("inf")]),
        "b": torch.tensor([float("nan")], dtype=torch.float16),
        "c": torch.zeros(3),
        "d": torch.tensor([5]),
    }
    assert tree.nonfinite(params) == ["a", "b"]
    assert tree.nonfinite({}) == []


@pytest.mark.parametrize("make", [Sequential, lambda: Threads(2)], ids=["sequential", "threads"])
def test_a_nan_uplink_fails_the_round_naming_client_and_round(make: Callable[[], Executor]) -> None:
    # Before: the NaN was averaged into the model and the run went on, reporting success.
    with pytest.raises(NonFiniteError) as info:
        _round(_algorithm(helpers.nan_for_client_3), make())
    assert info.value.clients == {3: ("w",)}
    assert info.value.round_index == 0
    message = str(info.value)
    assert message.startswith(
        "round 1: client 3 sent non-finite values (NaN or Inf; client 3: 'w')"
    )
    assert "--skip-nonfinite" in message


def test_skip_leaves_the_client_out_and_reports_it() -> None:
    state, report = _round(_algorithm(helpers.nan_for_client_3, nonfinite="skip"))
    assert report.skipped == (3,)
    assert report.clients == tuple(range(6))
    assert not tree.nonfinite(state.params)
    # The aggregate is exactly the mean over the five finite clients.
    uplinks = [
        helpers.noisy_update(
            broadcast_params(_algorithm(helpers.noisy_update).init(Key.from_seed(0))),
            CLIENTS[c],
            ClientTask(c, 0, Key.from_seed(1).fold_in(c)),
        )
        for c in (0, 1, 2, 4, 5)
    ]
    expected = mean_by_examples(_algorithm(helpers.noisy_update).init(Key.from_seed(0)), uplinks)
    assert tree.trees_equal(state.params, expected.params)
    assert report.num_examples == sum(u.num_examples for u in uplinks)


def _all_nan(downlink: object, data: float, task: ClientTask) -> Uplink:
    return Uplink(task.client_id, 1, {"w": torch.full((4,), math.nan), "n": torch.tensor(0)})


def test_skip_still_fails_when_every_client_is_non_finite() -> None:
    with pytest.raises(NonFiniteError, match=r"round 1: every sampled client \(6\)"):
        _round(_algorithm(_all_nan, nonfinite="skip"))


def _state_nan(downlink: object, data: float, task: ClientTask) -> Uplink:
    uplink = helpers.noisy_update(downlink, data, task)
    return attrs.evolve(uplink, state={"c": torch.tensor([math.inf])})


def test_a_non_finite_stored_state_counts_too() -> None:
    algorithm = _algorithm(_state_nan, dispatch=lambda s, ids: [ClientInput()] * len(ids))
    with pytest.raises(NonFiniteError) as info:
        _round(algorithm)
    assert info.value.clients[0] == ("state:c",)


def _overflowing_mean(state: ServerState, uplinks: Sequence[Uplink]) -> ServerState:
    new = mean_by_examples(state, uplinks)
    return attrs.evolve(new, params={**new.params, "w": new.params["w"] * math.inf})


def test_a_non_finite_server_model_fails_the_round() -> None:
    algorithm = attrs.evolve(_algorithm(helpers.noisy_update), aggregate=_overflowing_mean)
    with pytest.raises(NonFiniteError, match=r"round 1: the aggregated server model .* 'w'"):
        _round(algorithm)


def test_the_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="nonfinite"):
        _algorithm(helpers.noisy_update, nonfinite="ignore")


@pytest.mark.slow
def test_processes_catch_it_too() -> None:
    with pytest.raises(NonFiniteError, match="round 1: client 3"):
        _round(_algorithm(helpers.nan_for_client_3), Processes(2))


def _huge_step(downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
    # A finite but huge update of a float64 model: its square overflows Adam's float64 second
    # moment.
    params = {n: t + 1e200 for n, t in downlink.params.items()}
    return Uplink(task.client_id, len(data), params)


def _float64_model(shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    return logistic_regression(shape, classes).double()


def test_a_non_finite_optimizer_moment_fails_the_round_while_the_model_is_finite() -> None:
    # Before: v = inf made the step m / (sqrt(v) + tau) zero, so the model stayed finite and
    # the infinite moment was checkpointed silently round after round.
    data = synthetic(1.0, 1.0, num_clients=4, key=Key.from_seed(0))
    model_fn = functools.partial(_float64_model, data.input_shape, data.num_classes)
    algorithm = attrs.evolve(
        fedadam(model_fn, num_clients=4, clients_per_round=2, local=LocalSGD()),
        client_update=_huge_step,
    )
    state = algorithm.init(Key.from_seed(1))
    # The aggregate alone: a finite model, an infinite second moment.
    uplinks = [
        _huge_step(algorithm.broadcast(state), data.clients[i], ClientTask(i, 0, Key.from_seed(i)))
        for i in (0, 1)
    ]
    aggregated = cast(Callable[[ServerState, Sequence[Uplink]], ServerState], algorithm.aggregate)
    alone = aggregated(state, uplinks)
    assert not tree.nonfinite(alone.params)
    assert nonfinite_leaves(alone.aux)
    with Sequential() as ex, pytest.raises(NonFiniteError) as info:
        make_round(algorithm, data.clients, ex)(state, Key.from_seed(2))
    assert info.value.server, info.value
    assert all(name.startswith("aux.") for name in info.value.server), info.value.server
    assert "round 1: the aggregated server state (model or optimizer) has" in str(info.value)
