"""`privatize` on the named algorithms a user reaches for first: ``privatize(fedavg(...))`` is
the composed private FedAvg bit for bit, the FedAvg family privatises with its server
optimizer's state kept inside `DPState`, and an algorithm with its own aggregation rule is
refused in one line naming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest

import blazefl_fn as fl
from blazefl_fn.algorithms import feddyn, fednova, scaffold
from blazefl_fn.algorithms.compose import (
    Aggregate,
    compose,
    fedadagrad,
    fedadam,
    fedavgm,
    fedprox,
    fedyogi,
)
from blazefl_fn.privacy.mechanisms import AdaptiveClipping, CentralDP, DPState, LocalDP
from blazefl_fn.privacy.privatize import privatize
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import load_federation, model_factory
from blazefl_fn.tree import digest

CONFIG = RunConfig(clients=12, clients_per_round=4)
KEY = fl.Key.from_seed(3)
DATA = load_federation(CONFIG, KEY.fold_in("data"))
MODEL = model_factory(CONFIG, DATA)
COMMON: dict[str, Any] = {"num_clients": 12, "clients_per_round": 4, "local": fl.LocalSGD()}
COUNTS: dict[str, Any] = {"num_clients": 12, "clients_per_round": 4}

MECHANISMS: dict[str, CentralDP | LocalDP] = {
    "central": CentralDP(clip_norm=0.5, noise_multiplier=0.8),
    "adaptive": CentralDP(1.0, 0.5, AdaptiveClipping(count_noise=1.0)),
    "local": LocalDP(clip_norm=0.5, noise_multiplier=0.3),
}


def _run(algorithm: fl.Algorithm[Any, Any], rounds: int = 3) -> fl.ServerState[Any]:
    with fl.Sequential() as executor:
        round_fn = fl.make_round(algorithm, DATA.clients, executor)
        state, _ = fl.run_rounds(round_fn, algorithm.init(KEY.fold_in("init")), KEY, until=rounds)
    return state


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_privatized_fedavg_gives_the_bits_of_the_composed_private_fedavg(mechanism: str) -> None:
    dp = MECHANISMS[mechanism]
    named = _run(privatize(fl.fedavg(MODEL, **COMMON), dp, **COUNTS))
    composed_algorithm = compose("fedavg", MODEL, **COMMON, aggregate=Aggregate())
    composed = _run(privatize(composed_algorithm, dp, **COUNTS))
    assert digest(named.params) == digest(composed.params)
    assert digest(named.params) != digest(_run(fl.fedavg(MODEL, **COMMON)).params)
    if isinstance(dp, CentralDP):
        ours, theirs = cast(DPState[Any], named.aux), cast(DPState[Any], composed.aux)
        assert type(cast(object, ours)) is type(cast(object, theirs)) is DPState
        assert (ours.server, ours.clip_norm) == ({}, theirs.clip_norm)
        assert (theirs.clip_norm != dp.clip_norm) == (dp.adaptive is not None)
    else:
        assert named.aux == composed.aux == {}


def test_fedavg_is_the_composed_weighted_mean_bit_for_bit() -> None:
    plain = _run(fl.fedavg(MODEL, **COMMON))
    composed = _run(compose("fedavg", MODEL, **COMMON, aggregate=Aggregate()))
    assert digest(plain.params) == digest(composed.params)
    assert plain.aux == composed.aux == {}


FAMILY: dict[str, Callable[..., fl.Algorithm[Any, Any]]] = {
    "fedprox": lambda: fedprox(MODEL, **COMMON, mu=0.1),
    "fedavgm": lambda: fedavgm(MODEL, **COMMON),
    "fedadam": lambda: fedadam(MODEL, **COMMON),
    "fedyogi": lambda: fedyogi(MODEL, **COMMON),
    "fedadagrad": lambda: fedadagrad(MODEL, **COMMON),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_fedavg_family_keeps_its_server_state_inside_dp_state(name: str) -> None:
    plain = FAMILY[name]()
    private = privatize(plain, CentralDP(0.5, 0.8), **COUNTS)
    state = _run(private, rounds=1)
    assert state.round == 1
    aux = cast(DPState[Any], state.aux)
    assert type(cast(object, aux)) is DPState
    assert type(aux.server) is type(plain.init(KEY).aux)


def test_what_aggregates_by_its_own_rule_is_refused_naming_it() -> None:
    for build in (scaffold, feddyn, fednova):
        algorithm: fl.Algorithm[Any, Any] = build(MODEL, **COMMON)
        with pytest.raises(ValueError, match=f"^privatize needs .*'{algorithm.name}'") as caught:
            privatize(algorithm, CentralDP(1.0, 1.0), **COUNTS)
        assert str(caught.value).endswith(f"{algorithm.name!r} aggregates by its own rule")
        assert "\n" not in str(caught.value)


def test_central_dp_is_applied_once() -> None:
    private = privatize(fl.fedavg(MODEL, **COMMON), CentralDP(1.0, 1.0), **COUNTS)
    with pytest.raises(ValueError, match="'fedavg' has central DP already"):
        privatize(private, CentralDP(1.0, 2.0), **COUNTS)
    both = privatize(private, LocalDP(1.0, 1.0), **COUNTS)  # local noise on top: still one DPState
    assert type(cast(object, both.init(KEY).aux)) is DPState
