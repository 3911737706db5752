"""The per-client fast paths give the bits of the general ones, and fall back where they must.

Batched `Processes` messages, the working copy's cached state-dict layout, the fused
non-finite screen, the foreach weighted sum, the float loss sum and the reused generator state
(issue: many small clients at the floor's cost).
"""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Iterator

import _executor_helpers as helpers
import pytest
import torch

import blazefl_fn as fl
from blazefl_fn import keys as _streams
from blazefl_fn import tree
from blazefl_fn.algorithms.stages import broadcast_params, mean_by_examples
from blazefl_fn.client import _module_copy
from blazefl_fn.data import ClientData, TensorDataset
from blazefl_fn.errors import ClientError, GlobalRNGError
from blazefl_fn.executors import Processes, Sequential, Threads
from blazefl_fn.executors.jobs import ClientUpdate
from blazefl_fn.keys import Key
from blazefl_fn.models import mlp
from blazefl_fn.records import ServerState
from blazefl_fn.round import Algorithm, make_round
from blazefl_fn.run.simulate import run_rounds
from blazefl_fn.server.sampling import uniform_sampler

MANY = [0.01 * i for i in range(80)]  # enough clients that Processes sends several per message


def _toy(update: ClientUpdate[float]) -> Algorithm[float]:
    return Algorithm(
        name="toy",
        init=lambda key: ServerState(params={"w": torch.randn(4, generator=key.torch_generator())}),
        sample=uniform_sampler(len(MANY), len(MANY)),
        broadcast=broadcast_params,
        client_update=update,
        aggregate=mean_by_examples,
    )


def _digest(executor: fl.Executor, update: ClientUpdate[float] = helpers.noisy_update) -> str:
    algo = _toy(update)
    round_fn = make_round(algo, MANY, executor)
    state, _ = run_rounds(round_fn, algo.init(Key.from_seed(0)), Key.from_seed(1), until=2)
    return tree.digest(state.params)


@pytest.fixture(scope="module")
def pool() -> Iterator[Processes]:
    with Processes(2) as executor:
        yield executor


# -- Processes: several clients to a message ---------------------------------------------------


def test_batched_messages_give_the_bits_of_one_client_per_message(pool: Processes) -> None:
    assert pool._chunk(len(MANY)) > 1  # pyright: ignore[reportPrivateUsage]
    with Processes(2, client_timeout=60.0) as one_each:
        assert one_each._chunk(len(MANY)) == 1  # pyright: ignore[reportPrivateUsage]
        unbatched = _digest(one_each)
    assert _digest(pool) == unbatched == _digest(Sequential())


def test_slots_are_as_many_as_tasks_in_flight_not_one_per_client(pool: Processes) -> None:
    _digest(pool)
    slots = pool._slot_count(len(MANY))  # pyright: ignore[reportPrivateUsage]
    assert slots < len(MANY)
    assert pool._slot_count(3) == 3  # pyright: ignore[reportPrivateUsage]


def test_a_failure_inside_a_batch_names_its_client_and_the_pool_goes_on(pool: Processes) -> None:
    with pytest.raises(ClientError, match="client 7 failed in round 1: ZeroDivisionError"):
        _digest(pool, helpers.divide_by_zero_for_client_7)
    with pytest.raises(ClientError, match="client 1 failed in round 1: TypeError: its result"):
        _digest(pool, helpers.unsendable_for_client_1)
    assert _digest(pool) == _digest(Sequential())


@pytest.mark.parametrize("factory", [Sequential, lambda: Threads(2)], ids=["seq", "threads"])
def test_the_global_rng_guard_is_on_by_default(factory: type[Sequential]) -> None:
    with factory() as executor, pytest.raises(ClientError) as info:
        _digest(executor, helpers.global_draw_update)
    assert isinstance(info.value.__cause__, GlobalRNGError)


def test_the_global_rng_guard_fires_inside_a_batch(pool: Processes) -> None:
    with pytest.raises(ClientError, match="GlobalRNGError"):
        _digest(pool, helpers.global_draw_update)


def test_a_reply_names_a_known_layout_instead_of_pickling_its_spec() -> None:
    from blazefl_fn.executors import _worker

    down = {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.float64)}
    bound = tree.tree_spec(down)
    slots = torch.zeros(4 * bound.nbytes, dtype=torch.uint8)
    same = fl.Uplink(0, 1, {n: t + 1 for n, t in down.items()}, metrics={"loss": 0.5})
    reply = _worker._ok_reply(3, same, slots, bound.nbytes, bound.nbytes, bound)  # pyright: ignore[reportPrivateUsage]
    assert reply[3] == (_worker.SAME, _worker.EMPTY)
    assert b"TreeSpec" not in pickle.dumps(reply)
    assert tree.trees_equal(
        tree.unflatten(slots[bound.nbytes : 2 * bound.nbytes], bound), same.params
    )
    # another layout (fewer entries, stored state): sent as its spec, decoded to itself
    other = fl.Uplink(0, 1, {"w": down["w"]}, state={"c": torch.ones(2)}, metrics={})
    reply = _worker._ok_reply(0, other, slots, 0, bound.nbytes, bound)  # pyright: ignore[reportPrivateUsage]
    params_layout, state_layout = reply[3]
    assert _worker.spec_of(params_layout, bound) == tree.tree_spec(other.params)
    assert _worker.spec_of(state_layout, bound) == tree.tree_spec(other.state)
    assert _worker.spec_of(_worker.SAME, bound) is bound
    assert _worker.spec_of(_worker.EMPTY, bound) == tree.tree_spec({})


# -- the working copy's cached layout ----------------------------------------------------------


def _params(module: torch.nn.Module, scale: float) -> dict[str, torch.Tensor]:
    return {
        n: t.detach() * scale if t.is_floating_point() else t.detach() + 1
        for n, t in module.state_dict().items()
    }


def test_a_plain_module_loads_and_reads_through_its_layout() -> None:
    template = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = _params(template, 2.0)
    module = _module_copy.load_params(template, params)
    layout = _module_copy._layout_of(module)  # pyright: ignore[reportPrivateUsage]
    assert layout is not None  # BatchNorm's own loading is plain too
    assert layout.current()
    assert tree.trees_equal(_module_copy.state_of(module), params)
    assert list(_module_copy.state_of(module)) == list(module.state_dict())
    assert [n for n, _ in _module_copy.trainable(module)] == ["0.weight", "0.bias", "1.weight",
                                                              "1.bias"]  # fmt: skip


def test_hooks_take_the_general_path() -> None:
    template = torch.nn.Linear(3, 2)
    seen: list[str] = []
    template.register_load_state_dict_pre_hook(lambda *_: seen.append("pre"))  # pyright: ignore
    module = _module_copy.load_params(template, _params(template, 3.0))
    assert _module_copy._layout_of(module) is None  # pyright: ignore[reportPrivateUsage]
    assert seen == ["pre"]  # load_state_dict ran, with its hook
    assert tree.trees_equal(module.state_dict(), _params(template, 3.0))


def test_a_swapped_parameter_is_loaded_the_general_way() -> None:
    template = torch.nn.Linear(3, 2)
    module = _module_copy.load_params(template, _params(template, 1.0))
    layout = _module_copy._layout_of(module)  # pyright: ignore[reportPrivateUsage]
    assert layout is not None
    assert isinstance(module, torch.nn.Linear)
    module.weight = torch.nn.Parameter(torch.zeros(2, 3))  # a module replacing its own entry
    assert not layout.current()
    loaded = _module_copy.load_params(template, _params(template, 5.0))
    assert loaded is module
    assert torch.equal(module.weight, template.weight.detach() * 5.0)
    assert tree.trees_equal(_module_copy.state_of(module), _params(template, 5.0))


def test_a_wrong_shape_raises_load_state_dicts_error() -> None:
    template = torch.nn.Linear(3, 2)
    bad = {**_params(template, 1.0), "weight": torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        _module_copy.load_params(template, bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        _module_copy.load_params(template, {"weight": torch.zeros(2, 3)})


# -- the fused screen, the foreach sum, the float loss, the generator state ---------------------


def test_all_finite_agrees_with_nonfinite() -> None:
    finite = {"w": torch.randn(5), "n": torch.tensor([3])}
    assert tree.all_finite([finite, finite])
    assert tree.all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(5)
        w[2] = bad
        assert not tree.all_finite([finite, {"w": w}])
    # Finite values whose norm overflows: the exact check decides.
    assert tree.all_finite([{"w": torch.full((4,), 3e38)}])
    assert tree.all_finite([{"h": torch.full((4,), 6e4, dtype=torch.float16)}])
    assert not tree.all_finite([{"c": torch.tensor([complex(1.0, math.inf)])}])


def test_the_foreach_weighted_sum_has_the_bits_of_the_loop() -> None:
    g = torch.Generator().manual_seed(0)
    trees = [
        {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g),
         "n": torch.tensor(i)}
        for i in range(20)
    ]  # fmt: skip
    weights = [float(w) for w in torch.rand(20, generator=g)]
    expected: dict[str, torch.Tensor] = {}
    for name in trees[0]:
        acc = torch.zeros(trees[0][name].shape, dtype=torch.float64)
        for t, w in zip(trees, weights, strict=True):
            acc.add_(t[name].to(torch.float64), alpha=w)
        expected[name] = acc
    assert tree.trees_equal(tree.weighted_sum(trees, weights), expected)
    # Entries in another order, or of another shape: the plain loop, on its own terms.
    reordered = [dict(reversed(list(t.items()))) for t in trees]
    assert tree.trees_equal(tree.weighted_sum([trees[0], *reordered[1:]], weights), expected)


def test_the_float_loss_sum_has_the_bits_of_the_float64_tensor_sum() -> None:
    losses = [torch.tensor(v) for v in (2.3025851, 1.0000001, 0.3333333, 7.25)]
    as_floats: torch.Tensor | float | None = None
    as_tensor: torch.Tensor | None = None
    for i, loss in enumerate(losses):
        as_floats = _module_copy.accumulate(as_floats, loss, 10 + i)
        term = loss.to(torch.float64) * (10 + i)
        as_tensor = term if as_tensor is None else as_tensor + term
    assert isinstance(as_floats, float)
    assert _module_copy.mean_loss(as_floats, 46) == _module_copy.mean_loss(as_tensor, 46)


def test_a_reused_generator_state_is_the_fresh_one() -> None:
    keys = [Key.from_seed(s) for s in range(3)]
    fresh = [_streams.cpu_state(k.bits).clone() for k in keys]
    reused = _streams.cpu_state(keys[2].bits)
    for k, expected in zip(keys, fresh, strict=True):
        assert torch.equal(_streams.cpu_state(k.bits, out=reused), expected)
    draws = [torch.rand(3, generator=k.torch_generator()) for k in keys]
    assert not torch.equal(draws[0], draws[1])
    again = [torch.rand(3, generator=k.torch_generator()) for k in keys]
    assert all(torch.equal(a, b) for a, b in zip(draws, again, strict=True))


def test_fedavg_on_the_fast_paths_matches_across_executors(pool: Processes) -> None:
    g = torch.Generator().manual_seed(2)
    base = TensorDataset(torch.randn(400, 8, generator=g), torch.randint(0, 3, (400,), generator=g))
    clients = tuple(ClientData(base, torch.arange(i * 5, i * 5 + 5)) for i in range(80))
    algo = fl.fedavg(
        functools.partial(mlp, (8,), 3, hidden=(6,)),
        num_clients=80,
        clients_per_round=80,
        local=fl.LocalSGD(batch_size=5, lr=0.1),
    )

    def digest(executor: fl.Executor) -> str:
        state, _ = run_rounds(
            make_round(algo, clients, executor), algo.init(Key.from_seed(4)), Key.from_seed(5),
            until=2,
        )  # fmt: skip
        return tree.digest(state.params)

    with Threads(2) as threads:
        assert digest(pool) == digest(threads) == digest(Sequential())


@pytest.mark.parametrize("hooked", [False, True], ids=["layout", "load_state_dict"])
def test_loading_clears_gradients_a_failed_client_left_behind(hooked: bool) -> None:
    template = mlp((4,), 3, hidden=(5,))
    if hooked:  # a state-dict hook: the copy loads through load_state_dict, not its layout
        template.register_state_dict_post_hook(lambda *_: None)
    params = {k: v.detach().clone() for k, v in template.state_dict().items()}
    copy = _module_copy.load_params(template, params)
    assert (_module_copy._layout_of(copy) is None) == hooked  # pyright: ignore[reportPrivateUsage]
    for p in copy.parameters():  # a client that raised between backward and its step
        p.grad = torch.ones_like(p)
    again = _module_copy.load_params(template, params)
    assert again is copy
    assert all(p.grad is None for p in again.parameters())
