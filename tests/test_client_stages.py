"""The client side as stages: `train`, gradient transforms, loss terms, and packed trees."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn import tree
from blazefl_fn.algorithms.feddyn import _Quadratic  # pyright: ignore[reportPrivateUsage]
from blazefl_fn.client.optim import (
    InnerProduct,
    StepInput,
    add_proximal,
    add_proximal_to,
    add_trees,
    chain,
    freeze,
    identity,
    matches,
    momentum,
    train_only,
)
from blazefl_fn.client.training import LocalSGD, LocalTraining, train, trainable_names
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.keys import Key
from blazefl_fn.models import build_module, mlp

KEY = Key.from_seed(3)


def _client(n: int = 37, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    base = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return ClientData(base, torch.arange(n))


def _model() -> torch.nn.Module:
    return build_module(lambda: mlp((6,), 3, hidden=(8,)), Key.from_seed(1))


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return tree.from_module(module)


def test_local_sgd_is_local_training_without_stages() -> None:
    model, data = _model(), _client()
    config = LocalSGD(epochs=2, batch_size=5, lr=0.1)
    assert config == LocalTraining(epochs=2, batch_size=5, lr=0.1)
    out = train(model, _params(model), data, KEY, config)
    assert out.result.examples == 37
    assert out.result.steps == 2 * math.ceil(37 / 5)
    assert out.optimizer_state == {}


def test_identity_stage_and_zero_trees_give_plain_sgd_bits() -> None:
    """With zero variates, SCAFFOLD's corrected step is FedAvg's, bit for bit."""
    model, data = _model(), _client()
    plain = train(model, _params(model), data, KEY, LocalTraining(lr=0.1))
    names = trainable_names(model)
    zeros = {n: torch.zeros_like(_params(model)[n]) for n in names}
    for optimizer in (identity(), add_trees(plus=("c",), minus=("c_i",))):
        out = train(
            model, _params(model), data, KEY, LocalTraining(lr=0.1, optimizer=optimizer),
            trees={"c": zeros, "c_i": zeros},
        )  # fmt: skip
        assert tree.trees_equal(out.params, plain.params)


def test_proximal_stage_is_fedprox_s_gradient() -> None:
    """One step of FedProx by hand (Li et al. 2020, eq. 2): ``w - lr * (g + mu (w - w_t))``."""
    model, data = _model(), _client(n=5)
    start = _params(model)
    staged = train(
        model, start, data, KEY,
        LocalTraining(lr=0.1, batch_size=5, optimizer=add_proximal(0.3)),
    )  # fmt: skip
    plain = train(model, start, data, KEY, LocalTraining(lr=0.1, batch_size=5))
    # At the first (only) step w == w_t, so the term is zero: the plain step, bit for bit.
    assert tree.trees_equal(staged.params, plain.params)
    two = train(
        model, start, data, KEY,
        LocalTraining(lr=0.1, batch_size=5, epochs=2, optimizer=add_proximal(0.3)),
    )  # fmt: skip
    plain_two = train(model, start, data, KEY, LocalTraining(lr=0.1, batch_size=5, epochs=2))
    assert not tree.trees_equal(two.params, plain_two.params)


def test_proximal_loss_term_matches_the_proximal_gradient_stage() -> None:
    """The same regulariser as a loss term (autograd) and as a gradient stage (closed form)."""
    model, data = _model(), _client()
    as_stage = train(
        model, _params(model), data, KEY, LocalTraining(lr=0.1, optimizer=add_proximal(0.5))
    )
    as_loss = train(
        model, _params(model), data, KEY, LocalTraining(lr=0.1, loss_terms=(_Quadratic(0.5),))
    )
    for name in as_stage.params:
        assert torch.allclose(as_stage.params[name], as_loss.params[name], atol=1e-6)


def test_momentum_stage_is_torch_sgd_with_momentum_bit_for_bit() -> None:
    """An independent reference: torch.optim.SGD(momentum=beta) on the same batches."""
    model, data = _model(), _client()
    out = train(
        model,
        _params(model),
        data,
        KEY,
        LocalTraining(epochs=2, batch_size=5, lr=0.1, optimizer=momentum(0.9)),
    )
    ref = build_module(lambda: mlp((6,), 3, hidden=(8,)), Key.from_seed(1))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    generator = KEY.torch_generator()
    for _ in range(2):
        for x, y in data.batches(5, generator):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()  # pyright: ignore[reportUnknownMemberType]
            opt.step()
    assert tree.trees_equal(out.params, _params(ref))
    # The state is the momentum buffer, by name: it can be kept as client state.
    assert sorted(out.optimizer_state) == sorted(trainable_names(model))


def test_optimizer_state_carries_over_between_calls() -> None:
    model, data = _model(), _client()
    training = LocalTraining(lr=0.1, optimizer=momentum(0.5))
    first = train(model, _params(model), data, KEY, training)
    fresh = train(model, first.params, data, KEY, training)
    carried = train(model, first.params, data, KEY, training, optimizer_state=first.optimizer_state)
    assert not tree.trees_equal(fresh.params, carried.params)
    with pytest.raises(ValueError, match="optimizer_state was given but training has no optimizer"):
        train(
            model, first.params, data, KEY, LocalTraining(), optimizer_state=first.optimizer_state
        )


def test_train_never_writes_into_its_inputs() -> None:
    model, data = _model(), _client()
    params = _params(model)
    before = tree.digest(params)
    trees = {"c": {n: torch.ones_like(params[n]) for n in trainable_names(model)}}
    train(model, params, data, KEY, LocalTraining(optimizer=add_trees(plus=("c",))), trees=trees)
    assert tree.digest(params) == before
    assert all(bool((t == 1).all()) for t in trees["c"].values())


def test_an_empty_client_takes_no_step() -> None:
    model = _model()
    out = train(model, _params(model), _client(0), KEY, LocalTraining(optimizer=momentum(0.9)))
    assert out.result.steps == 0
    assert math.isnan(out.result.loss)
    assert tree.trees_equal(out.params, _params(model))


def test_a_missing_tree_is_named() -> None:
    model = _model()
    with pytest.raises(KeyError, match="no tree 'c' was supplied to local training"):
        train(
            model, _params(model), _client(), KEY, LocalTraining(optimizer=add_trees(plus=("c",)))
        )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: momentum(1.0), "momentum beta must be in"),
        (lambda: momentum(-0.1), "momentum beta must be in"),
        (lambda: add_trees(), "at least one tree name"),
        (lambda: add_proximal(-1.0), "mu must be a finite number >= 0"),
        (lambda: InnerProduct("h", math.inf), "weight must be a finite number"),
        (lambda: add_proximal_to("g", -1.0), "mu must be a finite number >= 0"),
        (lambda: add_proximal_to("", 1.0), "needs a tree name"),
        (lambda: train_only(), "at least one parameter name"),
        (lambda: freeze(""), "'' is not a parameter name"),
        (lambda: freeze("."), "'.' is not a parameter name"),
    ],
)
def test_bad_stage_arguments_are_refused(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(st.lists(floats, min_size=1, max_size=6), st.lists(floats, min_size=1, max_size=6))
def test_adding_and_subtracting_one_tree_leaves_the_gradient_bits(
    g: list[float], c: list[float]
) -> None:
    n = min(len(g), len(c))
    grads = {"w": torch.tensor(g[:n])}
    ctree = {"w": torch.tensor(c[:n])}
    inputs = StepInput(params=grads, anchor=grads, trees={"c": ctree}, step=0)
    out, _ = add_trees(plus=("c",), minus=("c",)).update(grads, {}, inputs)
    assert torch.equal(out["w"], grads["w"] + 0.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(floats, min_size=1, max_size=5), st.floats(0.0, 0.99), st.integers(1, 6))
def test_chained_momentum_keeps_its_state_under_its_index(
    g: list[float], beta: float, steps: int
) -> None:
    grads = {"w": torch.tensor(g)}
    opt = chain(add_proximal(0.0), momentum(beta))
    inputs = StepInput(params=grads, anchor=grads, trees={}, step=0)
    state = opt.init(grads)
    alone = momentum(beta)
    alone_state = alone.init(grads)
    for _ in range(steps):
        out, state = opt.update(grads, state, inputs)
        expected, alone_state = alone.update(grads, alone_state, inputs)
        assert torch.equal(out["w"], expected["w"])
    assert sorted(state) == ["1/w"]
    assert torch.equal(tree.unpack(state, "1")["w"], alone_state["w"])


def test_inner_product_and_quadratic_loss_values() -> None:
    w = {
        "a": torch.tensor([1.0, 2.0], requires_grad=True),
        "b": torch.tensor([3.0], requires_grad=True),
    }
    anchor = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}
    h = {"a": torch.tensor([2.0, -1.0]), "b": torch.tensor([0.5])}
    inputs = StepInput(params=w, anchor=anchor, trees={"h": h}, step=0)
    assert float(_Quadratic(2.0)(w, inputs).detach()) == pytest.approx(1 + 4 + 4)  # (2/2) * 9
    assert float(InnerProduct("h", -1.0)(w, inputs).detach()) == pytest.approx(-(2 - 2 + 1.5))


# -- packing named trees ------------------------------------------------------------------------

names = st.text("abcdefgh.", min_size=1, max_size=6)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text("xyz", min_size=1, max_size=3),
        st.dictionaries(names, st.integers(0, 9), max_size=3),
        max_size=3,
    )
)
def test_pack_then_split_gives_back_every_part(parts: dict[str, dict[str, int]]) -> None:
    trees = {p: {n: torch.tensor([v]) for n, v in t.items()} for p, t in parts.items()}
    packed = tree.pack(trees)
    split = tree.split_packed(packed)
    assert {p: t for p, t in trees.items() if t} == split
    for part, t in trees.items():
        assert tree.unpack(packed, part) == t


def test_pack_refuses_ambiguous_part_names_and_split_refuses_unpacked_trees() -> None:
    with pytest.raises(ValueError, match="without '/'"):
        tree.pack({"a/b": {}})
    with pytest.raises(ValueError, match="without '/'"):
        tree.pack({"": {}})
    with pytest.raises(ValueError, match="is not packed"):
        tree.split_packed({"w": torch.ones(1)})
    with pytest.raises(ValueError, match="has no '/'"):
        tree.unpack({}, "a/b")


def test_add_weighted_rounds_once_and_checks_its_arguments() -> None:
    base = {"w": torch.tensor([1.0], dtype=torch.float32)}
    small = [{"w": torch.tensor([1e-8])} for _ in range(1000)]
    # Each 1e-8 alone rounds away in float32; their float64 sum (1e-5) does not.
    assert float(tree.add_weighted(base, small, [1.0] * 1000)["w"]) == pytest.approx(1.00001)
    with pytest.raises(ValueError, match="got 1 trees but 2 weights"):
        tree.add_weighted(base, small[:1], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"weights\[\d+\] must be finite"):
        tree.add_weighted(base, small[:1], [math.nan])
    with pytest.raises(ValueError, match="lacks the names"):
        tree.add_weighted(base, [{"v": torch.ones(1)}], [1.0])


def _sgd_by_hand(
    model: torch.nn.Module,
    start: dict[str, torch.Tensor],
    data: ClientData,
    config: LocalTraining,
    direction: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """Mini-batch SGD in plain torch: ``w <- w - lr * direction(name, w, grad)`` on the
    batches `train` draws from ``KEY`` (a parameter whose direction is None is not stepped)."""
    w = {n: t.detach().clone().requires_grad_(True) for n, t in start.items()}
    generator = KEY.torch_generator()
    for _ in range(config.epochs):
        for x, y in data.batches(config.batch_size, generator):
            loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, w, (x,)), y)
            grads = torch.autograd.grad(loss, list(w.values()))
            with torch.no_grad():
                new: dict[str, torch.Tensor] = {}
                for (n, p), g in zip(w.items(), grads, strict=True):
                    d = direction(n, p, g)
                    new[n] = p if d is None else p - config.lr * d
            w = {n: t.detach().clone().requires_grad_(True) for n, t in new.items()}
    return {n: t.detach() for n, t in w.items()}


def test_proximal_to_a_named_tree_is_the_gradient_of_its_term_written_by_hand() -> None:
    """``v <- v - lr * (grad F(v) + lam * (v - w))``, Ditto's personal step (Li et al. 2021,
    Algorithm 1), with ``w`` a fixed tree and ``v`` starting elsewhere."""
    model, data = _model(), _client()
    start = _params(model)
    target = {n: t + 0.25 for n, t in start.items()}
    config = LocalTraining(lr=0.1, batch_size=8, epochs=2, optimizer=add_proximal_to("w", 0.7))
    out = train(model, start, data, KEY, config, trees={"w": target})
    rule = _sgd_by_hand(model, start, data, config, lambda n, v, g: g + 0.7 * (v - target[n]))
    for name in start:
        torch.testing.assert_close(out.params[name], rule[name], rtol=1e-5, atol=1e-6)
    # Toward the tree local training starts from, it is FedProx's stage bit for bit.
    prox = train(model, start, data, KEY, attrs.evolve(config, optimizer=add_proximal(0.7)))
    same = train(model, start, data, KEY, config, trees={"w": start})
    assert tree.trees_equal(prox.params, same.params)


@pytest.mark.parametrize("head", ["2", "2.weight"])
def test_train_only_and_freeze_step_the_selected_parameters_as_by_hand(head: str) -> None:
    model, data = _model(), _client()
    start = _params(model)
    only = LocalTraining(lr=0.1, batch_size=8, optimizer=train_only(head))
    frozen = LocalTraining(lr=0.1, batch_size=8, optimizer=freeze(head))
    for config, keep in ((only, True), (frozen, False)):
        out = train(model, start, data, KEY, config)
        selected = {n for n in start if matches(n, (head,)) == keep}
        rule = _sgd_by_hand(
            model, start, data, config, lambda n, v, g, on=selected: g if n in on else None
        )
        for name in start:
            if matches(name, (head,)) == keep:
                torch.testing.assert_close(out.params[name], rule[name], rtol=1e-5, atol=1e-6)
                assert not torch.equal(out.params[name], start[name])
            else:
                assert torch.equal(out.params[name], start[name]), name


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.sampled_from(["fc", "fc2", "0", "10", "body", "w"]), min_size=1, max_size=3),
    tail=st.sampled_from(["", ".weight", ".bias", ".0.weight", "x", "_b"]),
)
def test_a_pattern_matches_itself_and_what_lies_under_it_only(parts: list[str], tail: str) -> None:
    prefix = ".".join(parts)
    name = prefix + tail
    assert matches(name, (prefix,)) == (tail == "" or tail.startswith("."))
    assert matches(name, (prefix + ".",)) == (tail == "" or tail.startswith("."))


def test_the_new_stages_trace_under_vmap_as_one_client_at_a_time() -> None:
    """As `train_chunk` runs a chunk's stages: ``vmap`` over stacked clients, trees included."""
    g = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (3, 2), "0.bias": (3,), "2.weight": (2, 3)}
    stacked = {n: torch.randn(4, *s, generator=g) for n, s in shapes.items()}
    grads = {n: torch.randn(4, *s, generator=g) for n, s in shapes.items()}
    target = {n: torch.randn(4, *s, generator=g) for n, s in shapes.items()}
    for stage in (
        add_proximal_to("w", 0.3), train_only("2"), freeze("0"),
        chain(train_only("0"), add_proximal_to("w", 0.1), momentum(0.9)),
    ):  # fmt: skip

        def one(
            grad: dict[str, torch.Tensor],
            params: dict[str, torch.Tensor],
            trees: dict[str, torch.Tensor],
            stage: object = stage,
        ) -> dict[str, torch.Tensor]:
            inputs = StepInput(params=params, anchor=params, trees={"w": trees}, step=0)
            opt = stage  # the stage under test
            return opt.update(grad, opt.init(params), inputs)[0]  # type: ignore[attr-defined]

        mapped = torch.func.vmap(one, randomness="error")(grads, stacked, target)
        for c in range(4):
            each = one(
                {n: t[c] for n, t in grads.items()},
                {n: t[c] for n, t in stacked.items()},
                {n: t[c] for n, t in target.items()},
            )
            assert sorted(each) == sorted(mapped)
            for n in each:
                assert torch.equal(mapped[n][c], each[n])


def test_train_only_runs_in_a_vectorised_chunk_as_per_client() -> None:
    from blazefl_fn.client.chunk import train_chunk

    model = _model()
    start = _params(model)
    clients = [_client(n=n, seed=s) for s, n in enumerate((13, 21, 8))]
    keys = [KEY.fold_in(c) for c in range(3)]
    config = LocalTraining(lr=0.1, batch_size=4, optimizer=chain(freeze("0"), momentum(0.5)))
    chunk = train_chunk(model, start, clients, keys, config)
    for data, key, out in zip(clients, keys, chunk, strict=True):
        one = train(model, start, data, key, config)
        for name in start:
            if name.startswith("0."):
                assert torch.equal(out.params[name], start[name])
            torch.testing.assert_close(out.params[name], one.params[name], rtol=1e-5, atol=1e-6)
