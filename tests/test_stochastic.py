"""Keyed dropout is reproducible on every executor; a client that uses torch's global RNG is
caught on every executor, with advice, unless the algorithm opts out."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable

import attrs
import pytest
import torch
from torch import nn

import blazefl_fn as fl
from blazefl_fn.client.chunk import check_vectorizable
from blazefl_fn.client.stochastic import KeyedDropout, current_generator, dropout, keyed_rng
from blazefl_fn.errors import GlobalRNGError
from blazefl_fn.executors.jobs import global_rng_guard
from blazefl_fn.models import intra_op_threads
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import load_federation

KEY = fl.Key.from_seed(0)
CONFIG = RunConfig(clients=6, clients_per_round=4)
DATA = load_federation(CONFIG, KEY.fold_in("data"))
LOCAL = fl.LocalSGD(epochs=1, batch_size=8, lr=0.05)


def keyed_net(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(shape[0], 16), nn.ReLU(), KeyedDropout(0.5), nn.Linear(16, classes)
    )


def no_dropout_net(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(shape[0], 16), nn.ReLU(), KeyedDropout(0.0), nn.Linear(16, classes)
    )


def plain_net(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(shape[0], 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, classes)
    )


def _digest(
    model: Callable[..., nn.Module], executor: fl.Executor, allow: bool = False, close: bool = True
) -> str:
    model_fn = functools.partial(model, DATA.input_shape, DATA.num_classes)
    algo = fl.fedavg(model_fn, num_clients=6, clients_per_round=4, local=LOCAL)
    algo = attrs.evolve(algo, allow_global_rng=allow)
    with executor if close else contextlib.nullcontext(executor):
        state, _ = fl.run_rounds(
            fl.make_round(algo, DATA.clients, executor), algo.init(KEY), KEY, until=2
        )
    return fl.tree.digest(state.params)


EXECUTORS: list[Callable[[], fl.Executor]] = [
    fl.Sequential,
    lambda: fl.Threads(3),
    lambda: fl.Processes(2),
]


@pytest.mark.slow
def test_keyed_dropout_gives_one_digest_on_every_executor_and_it_is_random(
    processes2: fl.Processes,
) -> None:
    with intra_op_threads(1):  # as the process workers use
        digests = {_digest(keyed_net, make()) for make in EXECUTORS[:2] for _ in range(2)}
        digests |= {_digest(keyed_net, processes2, close=False) for _ in range(2)}
        without = _digest(no_dropout_net, fl.Sequential())
    assert len(digests) == 1, digests
    assert without not in digests  # the dropout layer does drop


@pytest.mark.parametrize("make", EXECUTORS[1:], ids=["threads", "processes"])
def test_nn_dropout_is_caught_with_advice(make: Callable[[], fl.Executor]) -> None:
    with pytest.raises(fl.ClientError) as info:
        _digest(plain_net, make())
    message = str(info.value)
    assert "GlobalRNGError" in message
    assert "torch's global RNG state changed" in message
    assert "KeyedDropout" in message
    assert "allow_global_rng=True" in message


def test_the_guard_can_be_turned_off() -> None:
    torch.manual_seed(0)
    first = _digest(plain_net, fl.Sequential(), allow=True)
    second = _digest(plain_net, fl.Sequential(), allow=True)
    assert first != second  # what the guard protects from: the global RNG moved on


def test_a_draw_without_a_generator_is_caught_by_the_sequential_executor() -> None:
    with pytest.raises(fl.ClientError, match=re.escape("torch.rand/randn/randperm/manual_seed")):
        _digest(plain_net, fl.Sequential())


def test_the_guard_passes_code_that_restores_the_global_rng() -> None:
    cpu = torch.device("cpu")
    with global_rng_guard(True, cpu), torch.random.fork_rng():
        torch.rand(3)  # drawn inside fork_rng: the state is restored on exit
    with pytest.raises(GlobalRNGError), global_rng_guard(True, cpu):
        torch.rand(3)
    with global_rng_guard(False, cpu):
        torch.rand(3)


def test_keyed_dropout_masks_depend_only_on_the_key() -> None:
    layer = KeyedDropout(0.5)
    x = torch.ones(64)
    with keyed_rng(KEY):
        a = layer(x)
    with keyed_rng(KEY):
        b = layer(x)
    with keyed_rng(KEY.fold_in(1)):
        c = layer(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a.tolist()) <= {0.0, 2.0}
    assert torch.equal(layer.eval()(x), x)  # the identity in eval mode


def test_keyed_dropout_outside_a_key_says_how_to_give_one() -> None:
    with pytest.raises(RuntimeError, match="needs a key"):
        KeyedDropout(0.5)(torch.ones(2))
    with pytest.raises(RuntimeError, match="needs a key"):
        current_generator(torch.device("cpu"))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout_probabilities_are_refused(p: float) -> None:
    with pytest.raises(ValueError, match="dropout probability must be in"):
        KeyedDropout(p)
    with pytest.raises(ValueError, match="dropout probability must be in"):
        dropout(torch.ones(1), p, KEY.torch_generator())


def test_dropout_does_not_write_into_its_input_and_keeps_the_mean() -> None:
    x = torch.ones(100_000)
    out = dropout(x, 0.3, KEY.torch_generator())
    assert torch.equal(x, torch.ones(100_000))
    assert float(out.mean()) == pytest.approx(1.0, abs=0.02)
    assert float((out == 0).float().mean()) == pytest.approx(0.3, abs=0.01)


def test_the_vectorized_executor_refuses_keyed_dropout() -> None:
    with pytest.raises(ValueError, match="keyed dropout draws one client's generator per step"):
        check_vectorizable(keyed_net((4,), 2))
