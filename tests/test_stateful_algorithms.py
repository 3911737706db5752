"""SCAFFOLD, FedDyn and FedNova: against their papers' update rules, their invariants, one digest
on every executor, bitwise resume, the CLI, and the error for a missing dispatch stage."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import _executor_helpers as helpers
import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call
from torch.nn import functional as F

import blazefl_fn as fl
from blazefl_fn import tree
from blazefl_fn.algorithms.feddyn import FedDynState, feddyn
from blazefl_fn.algorithms.fednova import fednova, normalizer
from blazefl_fn.algorithms.scaffold import ScaffoldState, scaffold
from blazefl_fn.cli._commands import main
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.models import logistic_regression
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import load_federation, simulate

KEY = fl.Key.from_seed(0)
CONFIG = RunConfig(clients=6, clients_per_round=3)
DATA = load_federation(CONFIG, KEY.fold_in("data"))
MODEL_FN = functools.partial(logistic_regression, DATA.input_shape, DATA.num_classes)
# The paper references run in float64, library and reference alike: in float32 the reference's
# own rounding drifts up to 1e-2 from exact arithmetic on some batch orders (measured: SCAFFOLD's
# variates amplify it over three rounds), so a float32 comparison tests luck, not the update
# rule. In float64 the two agree to ~1e-11.
DATA64 = tuple(
    ClientData(TensorDataset(c.base.x.double(), c.base.y), c.indices) for c in DATA.clients
)
ATOL64 = 1e-9


def MODEL_FN64() -> torch.nn.Module:
    return logistic_regression(DATA.input_shape, DATA.num_classes).double()


LOCAL = fl.LocalSGD(epochs=2, batch_size=8, lr=0.05)
Params = dict[str, torch.Tensor]


def _rounds(
    algorithm: fl.Algorithm[ClientData, object],
    rounds: int,
    clients: Sequence[ClientData] = DATA.clients,
) -> list[fl.ServerState]:
    """The initial state and the state after each of ``rounds`` rounds (sequential)."""
    states = [algorithm.init(KEY.fold_in("init"))]
    with fl.Sequential() as ex:
        round_fn = fl.make_round(algorithm, clients, ex)
        for _ in range(rounds):
            states.append(round_fn(states[-1], KEY.fold_in(states[-1].round))[0])
    return states


def _local_sgd(
    template: torch.nn.Module,
    start: Params,
    data: ClientData,
    key: fl.Key,
    direction: Callable[[str, torch.Tensor, Params], torch.Tensor],
) -> tuple[Params, int]:
    """Reference local training written from the papers: ``w <- w - lr * direction(grad)``,
    on the same batches as the library (the client key's shuffling)."""
    w = {n: t.clone() for n, t in start.items()}
    steps = 0
    generator = key.torch_generator()
    for _ in range(LOCAL.epochs):
        for x, y in data.batches(LOCAL.batch_size, generator):
            live = {n: t.clone().requires_grad_(True) for n, t in w.items()}
            loss = F.cross_entropy(functional_call(template, live, (x,)), y)
            grads = torch.autograd.grad(loss, list(live.values()))
            w = {n: w[n] - LOCAL.lr * direction(n, g, w) for n, g in zip(live, grads, strict=True)}
            steps += 1
    return w, steps


def _sampled(algorithm: fl.Algorithm[ClientData, object], state: fl.ServerState) -> list[int]:
    return sorted(algorithm.sample(state, KEY.fold_in(state.round).fold_in("sample")))


def _close(a: Params, b: Params, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=atol), (n, float((a[n] - b[n]).abs().max()))


# -- SCAFFOLD -------------------------------------------------------------------------------------


def test_scaffold_follows_the_papers_algorithm() -> None:
    """Karimireddy et al. 2020, Algorithm 1 with option II, over three rounds of 3 of 6 clients."""
    algo = scaffold(MODEL_FN64, num_clients=6, clients_per_round=3, local=LOCAL, server_lr=0.8)
    states = _rounds(algo, 3, DATA64)
    template = fl.build_template(MODEL_FN64)
    x = dict(states[0].params)
    c = {n: torch.zeros_like(t) for n, t in x.items()}
    c_i = [dict(c) for _ in range(6)]
    for state in states[:-1]:
        ids = _sampled(algo, state)
        ys, deltas = [], []
        for i in ids:
            key = KEY.fold_in(state.round).fold_in(i)
            y, k = _local_sgd(
                template, x, DATA64[i], key,
                lambda n, g, _w, ci=c_i[i], c=c: g - ci[n] + c[n],
            )  # fmt: skip
            new = {n: c_i[i][n] - c[n] + (x[n] - y[n]) / (k * LOCAL.lr) for n in x}
            deltas.append({n: new[n] - c_i[i][n] for n in x})
            c_i[i] = new
            ys.append(y)
        x = {n: x[n] + 0.8 * sum(y[n] - x[n] for y in ys) / len(ids) for n in x}
        c = {n: c[n] + sum(d[n] for d in deltas) / 6 for n in c}
    final = states[-1]
    assert isinstance(final.aux, ScaffoldState)
    _close(dict(final.params), x, ATOL64)
    _close(dict(final.aux.c), c, ATOL64)
    for i in range(6):
        if final.aux.clients[i]:
            _close(dict(final.aux.clients[i]), c_i[i], ATOL64)
        else:
            assert all(bool((t == 0).all()) for t in c_i[i].values())


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 1000))
def test_scaffold_server_variate_is_the_mean_of_client_variates_under_full_participation(
    seed: int,
) -> None:
    local = fl.LocalSGD(epochs=1, batch_size=4 + seed % 7, lr=0.02 + (seed % 5) / 100)
    algo = scaffold(MODEL_FN, num_clients=6, clients_per_round=6, local=local)
    final = _rounds(algo, 3)[-1]
    assert isinstance(final.aux, ScaffoldState)
    for n, c in final.aux.c.items():
        mean = sum(ci[n] for _, ci in final.aux.clients.items()) / 6
        assert final.aux.clients.num_stored == 6
        assert torch.allclose(c, mean, atol=1e-6)


def test_scaffold_uplink_and_downlink_carry_model_and_variates() -> None:
    algo = scaffold(MODEL_FN, num_clients=6, clients_per_round=3, local=LOCAL)
    with fl.Sequential() as ex:
        _, report = fl.make_round(algo, DATA.clients, ex)(algo.init(KEY.fold_in("init")), KEY)
    model_bytes = tree.nbytes(algo.init(KEY).params)
    assert report.bytes_down == 3 * 2 * model_bytes  # x and c to each client
    assert report.bytes_up == 3 * 2 * model_bytes  # y_i and the variate change back


# -- FedDyn ---------------------------------------------------------------------------------------


def test_feddyn_follows_the_papers_algorithm() -> None:
    """Acar et al. 2021, Algorithm 1, over three rounds of 3 of 6 clients."""
    alpha = 0.1
    algo = feddyn(MODEL_FN64, num_clients=6, clients_per_round=3, local=LOCAL, alpha=alpha)
    states = _rounds(algo, 3, DATA64)
    template = fl.build_template(MODEL_FN64)
    theta = dict(states[0].params)
    h = {n: torch.zeros_like(t) for n, t in theta.items()}
    g = [dict(h) for _ in range(6)]
    for state in states[:-1]:
        ids = _sampled(algo, state)
        thetas = []
        for k in ids:
            key = KEY.fold_in(state.round).fold_in(k)
            # The gradient of L_k(w) - <g_k, w> + alpha/2 ||w - theta||^2.
            w, _ = _local_sgd(
                template, theta, DATA64[k], key,
                lambda n, grad, w, gk=g[k], th=theta: grad - gk[n] + alpha * (w[n] - th[n]),
            )  # fmt: skip
            g[k] = {n: g[k][n] - alpha * (w[n] - theta[n]) for n in theta}
            thetas.append(w)
        h = {n: h[n] - alpha / 6 * sum(t[n] - theta[n] for t in thetas) for n in h}
        theta = {n: sum(t[n] for t in thetas) / len(ids) - h[n] / alpha for n in theta}
    final = states[-1]
    assert isinstance(final.aux, FedDynState)
    _close(dict(final.params), theta, ATOL64)
    _close(dict(final.aux.h), h, ATOL64)


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 1000))
def test_feddyn_server_state_is_the_mean_of_every_clients_gradient_state(seed: int) -> None:
    """``h = (1/N) sum_k g_k`` over all N clients (zero for those not yet sampled), any sampling."""
    algo = feddyn(
        MODEL_FN, num_clients=6, clients_per_round=1 + seed % 6, local=LOCAL,
        alpha=0.01 + (seed % 3) / 10,
    )  # fmt: skip
    final = _rounds(algo, 3)[-1]
    assert isinstance(final.aux, FedDynState)
    for n, h in final.aux.h.items():
        total = sum((gk[n] for _, gk in final.aux.clients.items()), torch.zeros_like(h))
        assert torch.allclose(h, total / 6, atol=1e-7)


# -- FedNova --------------------------------------------------------------------------------------


def test_normalizer_is_the_l1_norm_of_the_papers_a_vector() -> None:
    for tau in (1, 2, 5, 17):
        for rho in (0.0, 0.5, 0.9):
            # a = [(1 - rho^j) / (1 - rho) for j = 1..tau] (Wang et al. 2020, local momentum).
            a = [sum(rho**i for i in range(j)) for j in range(1, tau + 1)]
            assert normalizer(tau, rho) == pytest.approx(sum(a))


def test_fednova_follows_the_papers_update_with_unequal_local_steps() -> None:
    algo = fednova(MODEL_FN64, num_clients=6, clients_per_round=3, local=LOCAL)
    states = _rounds(algo, 2, DATA64)
    template = fl.build_template(MODEL_FN64)
    x = dict(states[0].params)
    for state in states[:-1]:
        ids = _sampled(algo, state)
        sizes = [len(DATA64[i]) for i in ids]
        runs = [
            _local_sgd(template, x, DATA64[i], KEY.fold_in(state.round).fold_in(i),
                       lambda _n, g, _w: g)
            for i in ids
        ]  # fmt: skip
        assert len({steps for _, steps in runs}) > 1  # the case FedNova exists for
        p = [n / sum(sizes) for n in sizes]
        tau_eff = sum(pi * steps for pi, (_, steps) in zip(p, runs, strict=True))
        x = {
            n: x[n]
            - tau_eff
            * sum(pi * (x[n] - y[n]) / steps for pi, (y, steps) in zip(p, runs, strict=True))
            for n in x
        }
    _close(dict(states[-1].params), x, ATOL64)


def test_fednova_with_equal_steps_is_fedavg_up_to_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    base = TensorDataset(
        torch.randn(80, *DATA.input_shape, generator=g),
        torch.randint(0, DATA.num_classes, (80,), generator=g),
    )
    clients = [ClientData(base, torch.arange(20 * i, 20 * i + 20)) for i in range(4)]
    nova = _rounds(fednova(MODEL_FN, num_clients=4, clients_per_round=4, local=LOCAL), 3, clients)
    avg = _rounds(fl.fedavg(MODEL_FN, num_clients=4, clients_per_round=4, local=LOCAL), 3, clients)
    _close(dict(nova[-1].params), dict(avg[-1].params), atol=1e-6)


def test_fednova_with_momentum_runs_and_refuses_hooks() -> None:
    algo = fednova(MODEL_FN, num_clients=6, clients_per_round=3, local=LOCAL, momentum=0.9)
    assert _rounds(algo, 1)[-1].round == 1
    with pytest.raises(ValueError, match="fednova normalises SGD"):
        fednova(
            MODEL_FN,
            num_clients=6,
            clients_per_round=3,
            local=attrs.evolve(LOCAL, optimizer=fl.client.optim.add_proximal(0.1)),
        )
    with pytest.raises(ValueError, match="momentum beta must be in"):
        fednova(MODEL_FN, num_clients=6, clients_per_round=3, local=LOCAL, momentum=1.0)


# -- every executor, resume, CLI -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["scaffold", "feddyn", "fednova"])
def test_one_digest_on_every_executor(algorithm: str, processes2: fl.Processes) -> None:
    base = RunConfig(algorithm=algorithm, clients=8, clients_per_round=4, rounds=3, batch_size=5)
    digests = {
        (executor, workers): simulate(
            attrs.evolve(base, executor=executor, workers=workers)
        ).params_sha256
        for executor, workers in [("sequential", 1), ("threads", 2), ("threads", 3)]
    }
    processes = attrs.evolve(base, executor="processes", workers=2)
    digests["processes", 2] = simulate(processes, executor=processes2).params_sha256
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["scaffold", "feddyn"])
def test_a_resumed_stateful_run_is_bitwise_the_uninterrupted_one(
    algorithm: str, tmp_path: Path
) -> None:
    config = RunConfig(algorithm=algorithm, clients=8, clients_per_round=3, rounds=4)
    whole = simulate(config)
    simulate(attrs.evolve(config, rounds=2), checkpoint_dir=tmp_path)
    resumed = simulate(config, resume=tmp_path)
    assert resumed.params_sha256 == whole.params_sha256
    assert resumed.state.aux is not None


@pytest.mark.parametrize("algorithm", ["scaffold", "feddyn", "fednova"])
def test_cli_runs_each_algorithm(algorithm: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "run",
                "--algorithm",
                algorithm,
                "--rounds",
                "2",
                "--json",
                "--quiet",
                "--executor",
                "threads",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    config = RunConfig(algorithm=algorithm, rounds=2)
    assert result["params_sha256"] == simulate(config).params_sha256


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--algorithm", "feddyn", "--feddyn-alpha", "0"],
            "feddyn_alpha must be a finite number in (0, 10000]",
        ),
        (
            ["--algorithm", "fednova", "--local-momentum", "1"],
            "local_momentum must be a finite number in [0, 1)",
        ),
        (
            ["--algorithm", "scaffold", "--local-momentum", "0.5"],
            "local_momentum applies to fednova",
        ),
        (
            ["--algorithm", "scaffold", "--clip-norm", "1"],
            "clip_norm clips updates of the FedAvg family",
        ),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--rounds", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]


# -- a stateful algorithm without its dispatch stage ----------------------------------------------


def test_clients_returning_state_without_dispatch_name_the_missing_stage() -> None:
    algo = attrs.evolve(
        scaffold(MODEL_FN, num_clients=6, clients_per_round=3, local=LOCAL), dispatch=None
    )
    with pytest.raises(ValueError, match="has no dispatch stage to keep it"):
        _rounds(algo, 1)


@pytest.mark.parametrize(
    "executor", [fl.Sequential, lambda: fl.Threads(2), lambda: fl.Processes(2)]
)
def test_a_client_reading_state_without_dispatch_names_the_missing_stage(
    executor: Callable[[], fl.Executor],
) -> None:
    algo = attrs.evolve(
        fl.fedavg(MODEL_FN, num_clients=6, clients_per_round=3, local=LOCAL),
        client_update=helpers.reads_stored_state,
    )
    with executor() as ex, pytest.raises(fl.ClientError, match="no dispatch stage") as info:
        fl.make_round(algo, DATA.clients, ex)(algo.init(KEY), KEY)
    assert "'1.weight'" in str(info.value)
    assert "KeyError" in str(info.value) or "MissingStage" in str(info.value)
