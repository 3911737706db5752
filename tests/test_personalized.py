"""Ditto, FedRep and FedPer: against their papers' update rules written here in plain torch, the
personal state in the client store, one digest on every executor, bitwise resume, the CLI."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call
from torch.nn import functional as F

import blazefl_fn as fl
from blazefl_fn.algorithms.ditto import ditto
from blazefl_fn.algorithms.fedper import fedper
from blazefl_fn.algorithms.fedrep import fedrep
from blazefl_fn.algorithms.personal import PersonalState, last_layer, personalized
from blazefl_fn.algorithms.stages import TrainUpdate, mean_by_examples
from blazefl_fn.cli._commands import main
from blazefl_fn.data.datasets import ClientData, FederatedDataset, TensorDataset, hold_out_clients
from blazefl_fn.models import mlp
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import load_federation, simulate

KEY = fl.Key.from_seed(0)
CONFIG = RunConfig(clients=6, clients_per_round=3)
DATA = load_federation(CONFIG, KEY.fold_in("data"))
# float64 on both sides, as in test_stateful_algorithms: the rules are compared, not rounding.
DATA64 = tuple(
    ClientData(TensorDataset(c.base.x.double(), c.base.y), c.indices) for c in DATA.clients
)
LOCAL = fl.LocalSGD(epochs=2, batch_size=8, lr=0.05)
Params = dict[str, torch.Tensor]
HEAD = ("3.weight", "3.bias")


def MODEL_FN64() -> torch.nn.Module:
    return mlp(DATA.input_shape, DATA.num_classes, hidden=(16,)).double()


def _rounds(
    algorithm: fl.Algorithm[ClientData, PersonalState], rounds: int
) -> list[fl.ServerState[PersonalState]]:
    states = [algorithm.init(KEY.fold_in("init"))]
    with fl.Sequential() as ex:
        round_fn = fl.make_round(algorithm, DATA64, ex)
        for _ in range(rounds):
            states.append(round_fn(states[-1], KEY.fold_in(states[-1].round))[0])
    return states


def _sgd(
    start: Params,
    data: ClientData,
    key: fl.Key,
    epochs: int,
    direction: Callable[[str, torch.Tensor, Params], torch.Tensor | None],
) -> Params:
    """Local SGD from the papers: ``w <- w - lr * direction(name, grad, w)`` (None: not stepped),
    on the batches the client key shuffles."""
    template = MODEL_FN64()
    w = {n: t.clone() for n, t in start.items()}
    generator = key.torch_generator()
    for _ in range(epochs):
        for x, y in data.batches(LOCAL.batch_size, generator):
            live = {n: t.clone().requires_grad_(True) for n, t in w.items()}
            loss = F.cross_entropy(functional_call(template, live, (x,)), y)
            grads = torch.autograd.grad(loss, list(live.values()))
            new: Params = {}
            for n, g in zip(live, grads, strict=True):
                d = direction(n, g, w)
                new[n] = w[n] if d is None else w[n] - LOCAL.lr * d
            w = new
    return w


def _sampled(
    algorithm: fl.Algorithm[ClientData, PersonalState], state: fl.ServerState
) -> list[int]:
    return sorted(algorithm.sample(state, KEY.fold_in(state.round).fold_in("sample")))


def _close(a: Params, b: Params, atol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=atol), (n, float((a[n] - b[n]).abs().max()))


def _check_store(state: fl.ServerState[PersonalState], personal: dict[int, Params]) -> None:
    assert state.aux.clients.ids() == tuple(sorted(personal))
    for cid, tree in personal.items():
        _close(state.aux.clients[cid], tree)


def test_ditto_follows_the_papers_algorithm() -> None:
    """Li et al. 2021, Algorithm 1: ``w_k`` by local SGD from ``w``; ``v_k`` by
    ``v - lr (grad F_k(v) + lam (v - w))``; ``w <- sum n_k w_k / sum n_k``."""
    lam = 0.3
    personal = attrs.evolve(LOCAL, epochs=3)
    algo = ditto(MODEL_FN64, num_clients=6, clients_per_round=3, local=LOCAL, lam=lam,
                 personal=personal)  # fmt: skip
    states = _rounds(algo, 3)
    w = dict(states[0].params)
    v: dict[int, Params] = {}
    for state in states[:-1]:
        ids = _sampled(algo, state)
        trained, sizes = [], []
        for i in ids:
            key = KEY.fold_in(state.round).fold_in(i)
            trained.append(_sgd(w, DATA64[i], key, LOCAL.epochs, lambda n, g, _w: g))
            sizes.append(len(DATA64[i]))
            start = v.get(i, w)
            v[i] = _sgd(
                start, DATA64[i], key.fold_in("personal"), 3,
                lambda n, g, cur, w=w: g + lam * (cur[n] - w[n]),
            )  # fmt: skip
        w = {n: sum(s * t[n] for s, t in zip(sizes, trained, strict=True)) / sum(sizes) for n in w}
    _close(states[-1].params, w)
    _check_store(states[-1], v)


def test_fedrep_follows_the_papers_algorithm() -> None:
    """Collins et al. 2021, Algorithm 1: the head's epochs with the body fixed, then the body's
    with the head fixed; the body's plain mean over sampled clients; heads stay on clients."""
    algo = fedrep(MODEL_FN64, num_clients=6, clients_per_round=3, local=LOCAL, head_epochs=3)
    states = _rounds(algo, 3)
    phi = dict(states[0].params)
    initial_head = {n: phi[n] for n in HEAD}
    heads: dict[int, Params] = {}
    for state in states[:-1]:
        bodies = []
        for i in _sampled(algo, state):
            key = KEY.fold_in(state.round).fold_in(i)
            start = {**phi, **heads.get(i, initial_head)}
            h = _sgd(start, DATA64[i], key.fold_in("head"), 3,
                     lambda n, g, _w: g if n in HEAD else None)  # fmt: skip
            b = _sgd(h, DATA64[i], key.fold_in("body"), LOCAL.epochs,
                     lambda n, g, _w: None if n in HEAD else g)  # fmt: skip
            heads[i] = {n: b[n] for n in HEAD}
            bodies.append({n: t for n, t in b.items() if n not in HEAD})
        for n in bodies[0]:
            phi[n] = sum(t[n] for t in bodies) / len(bodies)
    _close(states[-1].params, phi)
    _check_store(states[-1], heads)
    assert all(torch.equal(states[-1].params[n], initial_head[n]) for n in HEAD)


def test_fedper_follows_the_papers_algorithm() -> None:
    """Arivazhagan et al. 2019: local SGD of base and personalisation layers together; the base
    layers averaged by examples (FedAvg); the personalisation layers stay on clients."""
    algo = fedper(MODEL_FN64, num_clients=6, clients_per_round=3, local=LOCAL)
    states = _rounds(algo, 3)
    phi = dict(states[0].params)
    initial_head = {n: phi[n] for n in HEAD}
    heads: dict[int, Params] = {}
    for state in states[:-1]:
        bodies, sizes = [], []
        for i in _sampled(algo, state):
            key = KEY.fold_in(state.round).fold_in(i)
            out = _sgd({**phi, **heads.get(i, initial_head)}, DATA64[i], key, LOCAL.epochs,
                       lambda n, g, _w: g)  # fmt: skip
            heads[i] = {n: out[n] for n in HEAD}
            bodies.append({n: t for n, t in out.items() if n not in HEAD})
            sizes.append(len(DATA64[i]))
        for n in bodies[0]:
            phi[n] = sum(s * t[n] for s, t in zip(sizes, bodies, strict=True)) / sum(sizes)
    _close(states[-1].params, phi)
    _check_store(states[-1], heads)


def test_heads_travel_no_further_than_the_client() -> None:
    model_fn = functools.partial(mlp, DATA.input_shape, DATA.num_classes, hidden=(16,))
    body_bytes = sum(
        t.numel() * t.element_size() for n, t in model_fn().state_dict().items() if n not in HEAD
    )
    for make in (fedrep, fedper):
        algo = make(model_fn, num_clients=6, clients_per_round=3, local=LOCAL)
        with fl.Sequential() as ex:
            _, report = fl.make_round(algo, DATA.clients, ex)(algo.init(KEY), KEY)
        assert report.bytes_up == 3 * body_bytes


def test_the_helper_makes_a_stateful_algorithm_of_any_client_update() -> None:
    """`personalized` with FedAvg's own stages and no personal state is FedAvg, bit for bit."""
    model_fn = functools.partial(mlp, DATA.input_shape, DATA.num_classes, hidden=(16,))
    template = fl.build_template(model_fn)
    update = TrainUpdate(template, LOCAL)
    mine = personalized("mine", model_fn, num_clients=6, clients_per_round=3,
                        client_update=update, aggregate=mean_by_examples)  # fmt: skip
    plain = fl.fedavg(model_fn, num_clients=6, clients_per_round=3, local=LOCAL)
    finals = []
    for algo in (mine, plain):
        with fl.Sequential() as ex:
            state, _ = fl.run_rounds(fl.make_round(algo, DATA.clients, ex), algo.init(KEY), KEY,
                                     until=3)  # fmt: skip
        finals.append(fl.tree.digest(state.params))
    assert finals[0] == finals[1]


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (ditto, {"lam": -1.0}, "lam must be a finite number >= 0, got -1.0"),
        (ditto, {"lam": float("nan")}, "lam must be a finite number >= 0, got nan"),
        (fedrep, {"head_epochs": 0}, "head_epochs must be an integer >= 1, got 0"),
        (fedrep, {"head": ["9"]}, "'9' names no entry of the model"),
        (fedper, {"head": ["1", "3"]}, "holds every trainable parameter"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(
    make: Callable[..., object], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make(MODEL_FN64, num_clients=6, clients_per_round=3, local=LOCAL, **kwargs)


def test_last_layer_is_the_classifier() -> None:
    assert last_layer(MODEL_FN64()) == "3"


def _config(algorithm: str, **changes: object) -> RunConfig:
    values: dict[str, object] = {
        "algorithm": algorithm, "model": "mlp", "clients": 8, "clients_per_round": 4,
        "rounds": 3, "batch_size": 5, **({"head_epochs": 2} if algorithm == "fedrep" else {}),
    }  # fmt: skip
    return RunConfig(**{**values, **changes})  # type: ignore[arg-type]


def _digests(result: fl.RunResult) -> tuple[str, str]:
    return result.params_sha256, result.state.aux.clients.digest()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ditto", "fedrep", "fedper"])
def test_one_digest_on_every_executor(algorithm: str, processes2: fl.Processes) -> None:
    base = _config(algorithm)
    digests = {
        (executor, workers): _digests(
            simulate(attrs.evolve(base, executor=executor, workers=workers))
        )
        for executor, workers in [("sequential", 1), ("threads", 3)]
    }
    processes = attrs.evolve(base, executor="processes", workers=2)
    digests["processes", 2] = _digests(simulate(processes, executor=processes2))
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ditto", "fedrep", "fedper"])
def test_a_resumed_personalised_run_is_bitwise_the_uninterrupted_one(
    algorithm: str, tmp_path: Path
) -> None:
    config = _config(algorithm, rounds=4, clients_per_round=3)
    whole = simulate(config)
    simulate(attrs.evolve(config, rounds=2), checkpoint_dir=tmp_path)
    resumed = simulate(attrs.evolve(config, client_state_memory_mb=0), resume=tmp_path)
    assert _digests(resumed) == _digests(whole)
    assert whole.state.aux.clients.num_stored > 0


@pytest.mark.parametrize("algorithm", ["ditto", "fedrep", "fedper"])
def test_cli_runs_each_algorithm(algorithm: str, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--algorithm", algorithm, "--model", "mlp", "--rounds", "2", "--json", "--quiet"]
    assert main(["run", *flags, "--executor", "threads"]) == 0
    result = json.loads(capsys.readouterr().out)
    config = RunConfig(algorithm=algorithm, model="mlp", rounds=2)
    assert result["params_sha256"] == simulate(config).params_sha256


def test_cli_json_records_the_client_stores_digest_after_a_resume_as_after_a_straight_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["run", "--algorithm", "fedper", "--model", "mlp", "--json", "--quiet"]
    assert main([*flags, "--rounds", "4"]) == 0
    straight = json.loads(capsys.readouterr().out)
    ck = str(tmp_path / "ck")
    assert main([*flags, "--rounds", "2", "--checkpoint-dir", ck]) == 0
    halfway = json.loads(capsys.readouterr().out)
    assert main([*flags, "--rounds", "4", "--resume", ck]) == 0
    resumed = json.loads(capsys.readouterr().out)
    expected = simulate(RunConfig(algorithm="fedper", model="mlp", rounds=4))
    assert straight["client_state_sha256"] == expected.state.aux.clients.digest()
    assert resumed["client_state_sha256"] == straight["client_state_sha256"]
    assert resumed["params_sha256"] == straight["params_sha256"] == expected.params_sha256
    assert halfway["client_state_sha256"] != straight["client_state_sha256"]
    # Other algorithms with client state have it too; one without has null.
    assert main(["run", "--algorithm", "scaffold", "--rounds", "1", "--json", "--quiet"]) == 0
    scaffold = simulate(RunConfig(algorithm="scaffold", rounds=1)).state.aux.clients.digest()
    assert json.loads(capsys.readouterr().out)["client_state_sha256"] == scaffold
    assert main(["run", "--rounds", "1", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["client_state_sha256"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--algorithm", "ditto", "--ditto-lambda", "-1"], "ditto_lambda must be a finite number"),
        (["--algorithm", "ditto", "--ditto-lambda", "x"], "--ditto-lambda: invalid float value"),
        (["--algorithm", "fedavg", "--ditto-lambda", "1"], "ditto_lambda=1.0 applies to ditto"),
        (["--algorithm", "ditto", "--personal-epochs", "0"], "personal_epochs must be an integer"),
        (["--algorithm", "fedrep", "--personal-epochs", "2"], "personal_epochs=2 applies to ditto"),
        (["--algorithm", "fedrep", "--head-epochs", "0"], "head_epochs must be an integer"),
        (["--algorithm", "fedper", "--head-epochs", "3"], "head_epochs=3 applies to fedrep"),
        (["--algorithm", "fedper", "--head", ""], "head must be a non-empty string"),
        (["--algorithm", "fedper", "--head", "5,,3"], "head must be parameter names"),
        (["--algorithm", "fedavg", "--head", "5"], "head='5' applies to fedrep and fedper"),
        (["--algorithm", "fedper", "--head", "9"], "'9' names no entry of the model"),
        (["--algorithm", "fedrep", "--model", "logreg"], "logistic regression has one layer"),
        (["--algorithm", "ditto", "--clip-norm", "1"], "clip_norm clips updates"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = [] if "--model" in flags or flags[1] != "fedper" else ["--model", "mlp"]
    assert main(["run", "--rounds", "1", *model, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]


def test_personal_models_in_the_store_are_what_the_clients_kept() -> None:
    """Every stored tree is laid out as the algorithm says: a whole model, or the head."""
    model_fn = functools.partial(mlp, DATA.input_shape, DATA.num_classes, hidden=(16,))
    whole = ditto(model_fn, num_clients=6, clients_per_round=3, local=LOCAL)
    head = fedper(model_fn, num_clients=6, clients_per_round=3, local=LOCAL)
    for algo, names in ((whole, sorted(model_fn().state_dict())), (head, sorted(HEAD))):
        with fl.Sequential() as ex:
            state, _ = fl.make_round(algo, DATA.clients, ex)(algo.init(KEY), KEY)
        assert state.aux.clients.num_stored == 3
        assert all(sorted(tree) == names for _, tree in state.aux.clients.items())


# -- per-client test splits and per-client evaluation ---------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**64 - 1),
)
def test_held_out_splits_partition_each_client_from_its_own_key(
    sizes: list[int], fraction: float, seed: int
) -> None:
    base = TensorDataset(torch.zeros(sum(sizes), 1), torch.zeros(sum(sizes), dtype=torch.int64))
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    clients = tuple(
        ClientData(base, torch.arange(s, s + n).flip(0)) for s, n in zip(starts, sizes, strict=True)
    )
    fed = FederatedDataset("toy", clients, base, 2)
    key = fl.Key.from_seed(seed)
    out = hold_out_clients(fed, fraction, key)
    assert out.client_tests is not None
    for k, (client, train, test) in enumerate(
        zip(clients, out.clients, out.client_tests, strict=True)
    ):
        assert len(test) == round(fraction * len(client))
        together = torch.cat([train.indices, test.indices]).sort().values
        assert torch.equal(together, client.indices.sort().values)
        # Each part keeps the client's order of examples.
        for part in (train, test):
            position = {int(i): p for p, i in enumerate(client.indices)}
            order = [position[int(i)] for i in part.indices]
            assert order == sorted(order)
        # A client's split depends on its own key only: alone in a federation, the same.
        alone = hold_out_clients(FederatedDataset("one", (client,), base, 2), fraction, key)
        if k == 0:
            assert alone.client_tests is not None
            assert torch.equal(alone.client_tests[0].indices, test.indices)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, float("nan")])
def test_a_bad_fraction_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction must be in"):
        hold_out_clients(DATA, fraction, KEY)


def test_per_client_evaluation_uses_each_clients_personal_parameters() -> None:
    """Against a hand count: accuracy per client with its own parameters; mean, p10, std."""
    model_fn = functools.partial(mlp, DATA.input_shape, DATA.num_classes, hidden=(16,))
    algo = fedper(model_fn, num_clients=6, clients_per_round=3, local=LOCAL)
    split = hold_out_clients(DATA, 0.25, KEY)
    assert split.client_tests is not None
    with fl.Sequential() as ex:
        state, _ = fl.run_rounds(fl.make_round(algo, split.clients, ex), algo.init(KEY), KEY,
                                 until=2)  # fmt: skip
    template = fl.build_template(model_fn)
    out = fl.evaluate_clients(template, state.params, split.client_tests,
                              personal=state.aux.clients)  # fmt: skip
    accuracies = []
    for k, test in enumerate(split.client_tests):
        params = {**state.params, **state.aux.clients[k]}
        logits = functional_call(template, params, (test.base.x[test.indices],))
        accuracies.append(float((logits.argmax(1) == test.base.y[test.indices]).double().mean()))
    mean = sum(accuracies) / 6
    assert out["client_accuracy_uniform"] == pytest.approx(mean)
    assert out["client_accuracy_p10"] == min(accuracies)  # nearest rank of 6: the lowest
    std = (sum((a - mean) ** 2 for a in accuracies) / 6) ** 0.5
    assert out["client_accuracy_std"] == pytest.approx(std)
    assert state.aux.clients.num_stored > 0
    plain = fl.evaluate_clients(template, state.params, split.client_tests)
    assert plain != out


def test_cli_records_per_client_metrics_in_json_and_the_metrics_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "m.jsonl"
    flags = ["--algorithm", "ditto", "--model", "mlp", "--rounds", "2", "--json", "--quiet"]
    assert main(["run", *flags, "--client-test-fraction", "0.2", "--metrics", str(log)]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"client_accuracy", "client_accuracy_p10", "client_accuracy_std"}
    assert keys <= set(result["metrics"])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert keys <= set(records[-1]["eval"])
    config = RunConfig(algorithm="ditto", model="mlp", rounds=2, client_test_fraction=0.2)
    again = simulate(config)
    assert again.metrics["client_accuracy_std"] == result["metrics"]["client_accuracy_std"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "client_test_fraction must be a finite number in (0, 1)"),
        ("1", "client_test_fraction must be a finite number in (0, 1)"),
        ("nan", "client_test_fraction must be a finite number"),
        ("x", "--client-test-fraction: invalid float value"),
    ],
)
def test_cli_bad_client_test_fraction_exits_2_with_one_line(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--rounds", "1", "--client-test-fraction", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]
