"""FedAvg end to end: aggregation golden values, local training, determinism, purity."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from _rng import global_rng_untouched
from _training import train_local

from blazefl_fn import tree
from blazefl_fn.algorithms.fedavg import fedavg
from blazefl_fn.algorithms.stages import mean_by_examples
from blazefl_fn.client.evaluation import evaluate
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.executors import Sequential
from blazefl_fn.keys import Key
from blazefl_fn.models import build_module, logistic_regression, mlp
from blazefl_fn.records import ServerState, Uplink
from blazefl_fn.round import run_round
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.loop import Callback, RoundEvent
from blazefl_fn.run.simulate import load_federation, simulate

SMALL = RunConfig(clients=6, clients_per_round=3, rounds=3)


def _client(n: int, seed: int = 0) -> ClientData:
    generator = Key.from_seed(seed).torch_generator()
    base = TensorDataset(torch.randn(n, 5, generator=generator), torch.arange(n) % 3)
    return ClientData(base, torch.arange(n))


def test_mean_by_examples_golden() -> None:
    state = ServerState(params={"w": torch.zeros(2)}, round=4)
    uplinks = [
        Uplink(client_id=0, num_examples=1, params={"w": torch.tensor([4.0, 0.0])}),
        Uplink(client_id=2, num_examples=3, params={"w": torch.tensor([0.0, 8.0])}),
    ]
    new = mean_by_examples(state, uplinks)
    assert new.params["w"].tolist() == [1.0, 6.0]
    assert new.round == 5
    assert state.params["w"].tolist() == [0.0, 0.0]


def test_mean_by_examples_keeps_params_when_no_client_has_data() -> None:
    state = ServerState(params={"w": torch.ones(2)})
    uplinks = [Uplink(client_id=0, num_examples=0, params={"w": torch.zeros(2)})]
    new = mean_by_examples(state, uplinks)
    assert new.params is state.params
    assert new.round == 1


def test_train_local_is_pure_and_keyed() -> None:
    template = build_module(functools.partial(logistic_regression, (5,), 3), Key.from_seed(0))
    template_before = tree.digest(template.state_dict())
    params = tree.from_module(template)
    params_before = tree.digest(params)
    data = _client(23)
    data_before = tree.digest({"x": data.base.x, "y": data.base.y, "i": data.indices})
    config = LocalSGD(epochs=2, batch_size=4, lr=0.1)

    a, metrics = train_local(template, params, data, Key.from_seed(1), config)
    b, _ = train_local(template, params, data, Key.from_seed(1), config)
    c, _ = train_local(template, params, data, Key.from_seed(2), config)

    assert tree.digest(a) == tree.digest(b) != tree.digest(c)
    assert tree.digest(a) != params_before
    assert metrics["loss"] > 0
    assert tree.digest(params) == params_before
    assert tree.digest(template.state_dict()) == template_before
    assert tree.digest({"x": data.base.x, "y": data.base.y, "i": data.indices}) == data_before


def test_train_local_on_an_empty_client_returns_the_downlink_params() -> None:
    template = torch.nn.Linear(5, 3)
    params = tree.from_module(template)
    empty = ClientData(_client(4).base, torch.zeros(0, dtype=torch.int64))
    out, metrics = train_local(template, params, empty, Key.from_seed(0), LocalSGD())
    assert tree.trees_equal(out, params)
    assert np.isnan(metrics["loss"])


def test_evaluate_counts_accuracy_and_loss() -> None:
    module = torch.nn.Linear(2, 2, bias=False)
    params = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    data = TensorDataset(
        torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    )
    result = evaluate(module, params, data, batch_size=2)
    assert result["accuracy"] == pytest.approx(2 / 3)
    expected = torch.nn.functional.cross_entropy(data.x @ params["weight"].T, data.y)
    assert result["loss"] == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="empty dataset"):
        evaluate(
            module, params, TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))
        )


def test_one_client_round_equals_its_local_training() -> None:
    model_fn = functools.partial(mlp, (5,), 3, (4,))
    local = LocalSGD(epochs=1, batch_size=5, lr=0.5)
    algo = fedavg(model_fn, num_clients=1, clients_per_round=1, local=local)
    state = algo.init(Key.from_seed(0))
    round_key = Key.from_seed(7)
    data = _client(12)
    new_state, _ = run_round(algo, [data], Sequential(), state, round_key)
    direct, _ = train_local(
        build_module(model_fn, Key.from_seed(3)), state.params, data, round_key.fold_in(0), local
    )
    assert tree.digest(new_state.params) == tree.digest(direct)


def test_fedavg_round_leaves_state_and_data_unchanged() -> None:
    model_fn = functools.partial(logistic_regression, (5,), 3)
    algo = fedavg(model_fn, num_clients=3, clients_per_round=3, local=LocalSGD(batch_size=3))
    state = algo.init(Key.from_seed(0))
    clients = [_client(9, seed) for seed in range(3)]
    before = tree.digest(state.params)
    data_before = [tree.digest({"x": c.base.x, "y": c.base.y}) for c in clients]
    new_state, report = run_round(algo, clients, Sequential(), state, Key.from_seed(1))
    assert tree.digest(state.params) == before
    assert [tree.digest({"x": c.base.x, "y": c.base.y}) for c in clients] == data_before
    assert tree.digest(new_state.params) != before
    assert report.num_examples == 27


def test_init_depends_on_the_key_not_on_global_seed() -> None:
    model_fn = functools.partial(logistic_regression, (5,), 3)
    algo = fedavg(model_fn, num_clients=2, clients_per_round=1, local=LocalSGD())
    torch.manual_seed(123)
    a = algo.init(Key.from_seed(0))
    torch.manual_seed(456)
    b = algo.init(Key.from_seed(0))
    c = algo.init(Key.from_seed(1))
    assert tree.digest(a.params) == tree.digest(b.params) != tree.digest(c.params)


def test_same_seed_same_bits_other_seed_other_bits() -> None:
    first = simulate(SMALL)
    again = simulate(SMALL)
    other = simulate(RunConfig(clients=6, clients_per_round=3, rounds=3, seed=1))
    assert first.params_sha256 == again.params_sha256
    assert first.params_sha256 != other.params_sha256
    assert [r.clients for r in first.reports] == [r.clients for r in again.reports]


def test_simulation_leaves_global_rng_alone() -> None:
    with global_rng_untouched():
        simulate(SMALL)


class _OnRound(Callback):
    def __init__(self, fn: Callable[[RoundEvent], object]) -> None:
        self.fn = fn

    def on_round_end(self, event: RoundEvent) -> None:
        self.fn(event)


def test_simulation_reports_rounds_and_metrics() -> None:
    seen: list[tuple[int, bool]] = []
    result = simulate(
        RunConfig(clients=6, clients_per_round=2, rounds=5, eval_every=2),
        [_OnRound(lambda event: seen.append((event.report.round, event.metrics is not None)))],
    )
    assert seen == [(0, False), (1, True), (2, False), (3, True), (4, True)]
    assert result.state.round == 5
    assert 0.0 <= result.accuracy <= 1.0
    assert all(len(r.clients) == 2 for r in result.reports)
    assert result.reports[0].bytes_down == 2 * tree.nbytes(result.state.params)


def test_zero_rounds_evaluates_the_initial_model() -> None:
    result = simulate(RunConfig(clients=4, clients_per_round=2, rounds=0))
    assert result.reports == ()
    assert 0.0 <= result.accuracy <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clients": 0}, r"clients must be an integer in \[1, 10000000\], got 0"),
        ({"clients": 5, "clients_per_round": 6}, r"clients_per_round \(6\) exceeds clients \(5\)"),
        ({"rounds": -1}, r"rounds must be an integer in \[0, 10000000\], got \-1"),
        ({"lr": 0.0}, r"lr must be a finite number in \(0, 10000\]"),
        ({"lr": float("nan")}, r"lr must be a finite number in \(0, 10000\]"),
        ({"seed": -2}, r"seed must be an integer in \[0, 2\*\*128 \- 1\]"),
        ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
        ({"algorithm": "fedsgd"}, "unknown algorithm 'fedsgd'"),
        ({"dataset": "mnist"}, "needs a data directory"),
        ({"partition": "shards"}, "partitioned by its generator"),
        ({"alpha": -0.5}, r"alpha must be a finite number in \(0, 1e\+06\]"),
        ({"batch_size": True}, "batch_size must be an integer"),
    ],
)
def test_run_config_refuses_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunConfig(**kwargs)  # type: ignore[arg-type]


def test_local_sgd_is_bitwise_torch_optim_sgd() -> None:
    model_fn = functools.partial(mlp, (5,), 3, (8,))
    template = build_module(model_fn, Key.from_seed(0))
    params = tree.from_module(template)
    data = _client(30)
    key = Key.from_seed(4)
    config = LocalSGD(epochs=2, batch_size=7, lr=0.3)
    ours, _ = train_local(template, params, data, key, config)

    reference = build_module(model_fn, Key.from_seed(0))
    optimizer = torch.optim.SGD(reference.parameters(), lr=config.lr)
    generator = key.torch_generator()
    for _ in range(config.epochs):
        for x, y in data.batches(config.batch_size, generator):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
    assert tree.digest(ours) == tree.digest(reference.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"lr": -1.0}, r"lr must be a finite number > 0, got -1.0"),
        ({"lr": True}, "lr must be a finite number > 0, got True"),
        ({"lr": float("inf")}, "got inf"),
    ],
)
def test_local_sgd_refuses_bad_hyperparameters(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LocalSGD(**kwargs)  # type: ignore[arg-type]


def test_simulation_restores_the_callers_thread_count() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    simulate(
        RunConfig(clients=4, clients_per_round=2, rounds=1, threads=1),
        [_OnRound(lambda event: seen.append(torch.get_num_threads()))],
    )
    assert seen == [1]
    assert torch.get_num_threads() == before


def test_reused_working_copies_do_not_leak_between_clients() -> None:
    config = RunConfig(clients=4, clients_per_round=2)
    data = load_federation(config, Key.from_seed(0).fold_in("data"))
    template = mlp(data.input_shape, data.num_classes)
    start = tree.from_module(template)
    local = LocalSGD(epochs=2, batch_size=5, lr=0.1)
    key = Key.from_seed(1)
    # Client 1 alone, on a fresh template copy (nothing cached for it yet) ...
    fresh, _ = train_local(copy.deepcopy(template), start, data.clients[1], key, local)
    # ... equals client 1 after client 0 and an evaluation used the same working copy.
    train_local(template, start, data.clients[0], key, local)
    evaluate(template, start, data.test)
    reused, _ = train_local(template, start, data.clients[1], key, local)
    assert tree.digest(reused) == tree.digest(fresh)
    assert tree.trees_equal(start, tree.from_module(template))  # the template is untouched


def test_modules_with_state_outside_the_state_dict_are_copied_every_time() -> None:
    from blazefl_fn.client.distillation import working_copy

    plain = torch.nn.Linear(2, 2)
    assert working_copy(plain) is working_copy(plain)
    hidden = torch.nn.Linear(2, 2)
    hidden.register_buffer("steps", torch.zeros(1), persistent=False)
    assert working_copy(hidden) is not working_copy(hidden)
