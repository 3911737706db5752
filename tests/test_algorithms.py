"""The algorithm library: compositions, algebraic identities, the CLI on every executor."""

from __future__ import annotations

import functools
import json

import attrs
import pytest
import torch
from _training import train_local

from blazefl_fn.algorithms.compose import Aggregate, compose, fedavgm, fedprox
from blazefl_fn.algorithms.fedavg import fedavg
from blazefl_fn.cli._commands import main
from blazefl_fn.client.optim import add_proximal
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.executors import Processes, Sequential
from blazefl_fn.keys import Key
from blazefl_fn.models import build_module, logistic_regression
from blazefl_fn.round import make_round
from blazefl_fn.run.config import ALGORITHMS, DISTILLATION, RunConfig
from blazefl_fn.run.simulate import load_federation, run_rounds, simulate
from blazefl_fn.server.optim import sgd
from blazefl_fn.tree import digest, sub

CONFIG = RunConfig(clients=8, clients_per_round=6, rounds=3)
LOCAL = LocalSGD(epochs=2, batch_size=10, lr=0.05)


def _run(algorithm_fn: functools.partial[object], rounds: int = 3) -> dict[str, torch.Tensor]:
    key = Key.from_seed(0)
    data = load_federation(CONFIG, key.fold_in("data"))
    algorithm = algorithm_fn(
        functools.partial(logistic_regression, data.input_shape, data.num_classes),
        num_clients=len(data.clients),
        clients_per_round=6,
        local=LOCAL,
    )
    with Sequential() as executor:
        state, _ = run_rounds(
            make_round(algorithm, data.clients, executor),  # type: ignore[arg-type]
            algorithm.init(key.fold_in("init")),  # type: ignore[attr-defined]
            key,
            until=rounds,
        )
    return dict(state.params)


def test_fedprox_with_mu_zero_is_fedavg_bitwise() -> None:
    plain = _run(functools.partial(fedavg))
    assert digest(_run(functools.partial(fedprox, mu=0.0))) == digest(plain)


def test_fedavgm_without_momentum_and_fedopt_sgd_lr1_are_fedavg_bitwise() -> None:
    plain = digest(_run(functools.partial(fedavg)))
    assert digest(_run(functools.partial(fedavgm, server_lr=1.0, beta=0.0))) == plain
    opt = functools.partial(compose, "fedsgd", aggregate=Aggregate(server=sgd(1.0)))
    assert digest(_run(opt)) == plain


@pytest.mark.parametrize("seed", range(4))
def test_fedprox_pulls_local_models_towards_the_global_one(seed: int) -> None:
    config = RunConfig(clients=4, clients_per_round=2)
    data = load_federation(config, Key.from_seed(0).fold_in("data"))
    model_fn = functools.partial(logistic_regression, data.input_shape, data.num_classes)
    model = build_module(model_fn, Key.from_seed(seed))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    drift: dict[float, float] = {}
    for mu in (0.0, 1.0, 4.0):
        local = attrs.evolve(LOCAL, optimizer=add_proximal(mu))
        trained, _ = train_local(model, start, data.clients[0], Key.from_seed(3), local)
        drift[mu] = sum(float(d.norm()) ** 2 for d in sub(trained, start).values())
    # With lr * mu < 1 the proximal step is a contraction towards the start.
    assert drift[0.0] > drift[1.0]
    assert drift[0.0] > drift[4.0]


def test_clipping_bounds_the_global_step() -> None:
    clip = 0.05
    config = attrs.evolve(CONFIG, rounds=1)
    start = simulate(attrs.evolve(config, rounds=0)).state.params
    for algorithm in ("fedavg", "fedmedian"):
        clipped = simulate(attrs.evolve(config, algorithm=algorithm, clip_norm=clip)).state.params
        step = sum(float(d.double().norm()) ** 2 for d in sub(clipped, start).values()) ** 0.5
        assert step <= clip * (1 + 1e-6), (algorithm, step)
    loose = simulate(attrs.evolve(config, clip_norm=1e9)).state.params
    plain = simulate(config).state.params
    for name, value in plain.items():
        torch.testing.assert_close(loose[name], value, rtol=0, atol=1e-6)


def test_server_state_survives_checkpoint_resume_bitwise(tmp_path: object) -> None:
    config = attrs.evolve(CONFIG, algorithm="fedadam", rounds=4)
    whole = simulate(config)
    simulate(attrs.evolve(config, rounds=2), checkpoint_dir=tmp_path)  # type: ignore[arg-type]
    resumed = simulate(config, resume=tmp_path)  # type: ignore[arg-type]
    assert resumed.params_sha256 == whole.params_sha256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "krum", "clients_per_round": 4}, "needs clients_per_round > 2\\*krum_f"),
        ({"algorithm": "krum", "krum_m": 7}, "krum_m \\(7\\) exceeds clients_per_round \\(6\\)"),
        ({"trim_beta": 0.5}, r"trim_beta must be a finite number in \[0, 0\.5\), got 0\.5"),
        (
            {"server_momentum": 1.0},
            r"server_momentum must be a finite number in \[0, 1\), got 1\.0",
        ),
        ({"server_lr": 0.0}, r"server_lr must be a finite number in \(0, 10000\]"),
        ({"clip_norm": -1.0}, r"clip_norm must be a finite number in \(0, 1e\+12\]"),
        ({"mu": float("nan")}, "mu must be a finite number"),
    ],
)
def test_bad_hyperparameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attrs.evolve(CONFIG, **kwargs)


# The parameter-averaging algorithms; DS-FL and SCARLET need a public set (test_distillation).
AVERAGING = tuple(a for a in ALGORITHMS if a not in DISTILLATION)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", AVERAGING)
def test_every_algorithm_gives_one_digest_on_every_executor(
    algorithm: str, capsys: pytest.CaptureFixture[str], processes2: Processes
) -> None:
    flags = ["run", "--json", "--quiet", "--algorithm", algorithm, "--clients", "8",
             "--clients-per-round", "6", "--rounds", "3", "--local-epochs", "2"]  # fmt: skip
    assert main([*flags, "--executor", "threads", "--workers", "2"]) == 0
    digests = {"threads (CLI)": json.loads(capsys.readouterr().out)["params_sha256"]}
    config = RunConfig(algorithm=algorithm, clients=8, clients_per_round=6, rounds=3,
                       local_epochs=2, workers=2)  # fmt: skip
    digests["sequential"] = simulate(config).params_sha256
    # One pool for every algorithm: a warm pool must give each run its own bits.
    processes = attrs.evolve(config, executor="processes")
    digests["processes"] = simulate(processes, executor=processes2).params_sha256
    assert len(set(digests.values())) == 1, digests


def test_algorithms_differ_from_each_other() -> None:
    seen = {
        name: simulate(attrs.evolve(CONFIG, algorithm=name)).params_sha256 for name in AVERAGING
    }
    # Ditto's global model is FedAvg's (its personal steps draw from their own key and never
    # reach the server): the same bits, as the paper's global update says.
    assert seen.pop("ditto") == seen["fedavg"]
    assert len(set(seen.values())) == len(seen), seen
