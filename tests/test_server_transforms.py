"""Server transforms: FedAvg equivalence, golden values for Reddi et al.'s Algorithm 2, purity,
pickling and preconditions.

Measured exactness: ``params + sgd(1)(mean - params)`` (float64 delta, one rounding) is bitwise
the mean, up to the sign of zero (a mean of -0.0 next to a global +0.0 comes back +0.0), whenever
the float64 subtraction is exact: always for float16 params, and for
float32/bfloat16 params whenever each coordinate's global and aggregated values are within a
factor 2**28 of each other (or one is zero). Otherwise it is within float64 rounding of the
larger of the two: within one ulp of the params' dtype at that magnitude.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blazefl_fn import tree
from blazefl_fn.server.aggregators import mean
from blazefl_fn.server.optim import (
    AdaptiveState,
    Chain,
    ChainState,
    EmptyState,
    MomentumState,
    ServerTransform,
    adagrad,
    adam,
    apply_updates,
    chain,
    momentum,
    round_delta,
    server_step,
    sgd,
    yogi,
)
from blazefl_fn.testing import aggregators as testing

FEW = settings(max_examples=25)

TRANSFORMS: dict[str, ServerTransform[Any]] = {
    "sgd": sgd(0.5),
    "momentum": momentum(0.5, 0.9),
    "adam": adam(0.1),
    "yogi": yogi(0.1),
    "adagrad": adagrad(0.1),
    "chain": chain(sgd(2.0), momentum(1.0, 0.5), adam(0.1)),
}


def _state_digests(state: object) -> list[str]:
    """Digests of every tree inside a (possibly nested) state record."""
    if isinstance(state, dict):
        return [tree.digest(state)]  # type: ignore[arg-type]
    if isinstance(state, tuple):
        return [d for item in state for d in _state_digests(item)]  # type: ignore[union-attr]
    if attrs.has(type(state)):
        return [
            d
            for field in attrs.fields(type(state))
            for d in _state_digests(getattr(state, field.name))
        ]
    raise AssertionError(f"unexpected state part {state!r}")


def _same_structure(params: tree.Params) -> testing.TreeStructure:
    return testing.TreeStructure(
        entries=tuple((n, tuple(t.shape), t.dtype) for n, t in params.items())
    )


# --------------------------------------------------------------------------------------------
# FedAvg equivalence


@st.composite
def _global_and_batch(
    draw: st.DrawFn, dtypes: Sequence[torch.dtype], max_abs: float | None
) -> tuple[dict[str, torch.Tensor], testing.ClientBatch]:
    structure = draw(testing.tree_structures(dtypes=dtypes))
    params = draw(testing.trees_like(structure, max_abs=max_abs))
    batch = draw(testing.client_batches(structure=structure, max_abs=max_abs))
    return params, batch


def _close_magnitudes(params: tree.Params, other: tree.Params) -> bool:
    """Whether every coordinate pair is within a factor 2**28 (or one of them is zero)."""
    for name, p in params.items():
        a, b = p.to(torch.float64).abs(), other[name].to(torch.float64).abs()
        both = (a > 0) & (b > 0)
        ratio = torch.maximum(a, b)[both] / torch.minimum(a, b)[both]
        if ratio.numel() and float(ratio.max()) > 2.0**28:
            return False
    return True


def _equal_up_to_the_sign_of_zero(a: tree.Params, b: tree.Params) -> bool:
    """Bitwise equal, except that +0.0 and -0.0 count as one value."""
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and torch.equal(a[n], b[n]) for n in a
    )


# Found by hypothesis (issue 35): a mean that rounds to -0.0 next to a global +0.0.
_SIGNED_ZERO = (
    {"w": torch.tensor([0.0], dtype=torch.float16)},
    testing.ClientBatch(
        trees=(
            {"w": torch.tensor([0.0], dtype=torch.float16)},
            {"w": torch.tensor([-5.96e-08], dtype=torch.float16)},
        ),
        weights=(1.0, 1.0),
    ),
)


@FEW
@given(data=_global_and_batch([torch.float16], max_abs=None))
@example(data=_SIGNED_ZERO)
def test_sgd_one_on_the_mean_delta_is_fedavg_bitwise_for_float16(
    data: tuple[dict[str, torch.Tensor], testing.ClientBatch],
) -> None:
    params, batch = data
    aggregated = mean(batch.trees, batch.weights)
    new, state = server_step(sgd(1.0), params, aggregated, sgd(1.0).init(params))
    assert _equal_up_to_the_sign_of_zero(new, aggregated)
    assert isinstance(state, EmptyState)


def test_a_mean_of_minus_zero_comes_back_as_plus_zero() -> None:
    # The one exception to "bitwise", as the module says: 0 + (-0.0) is +0.0 in IEEE 754.
    params, batch = _SIGNED_ZERO
    aggregated = mean(batch.trees, batch.weights)
    assert bool(torch.signbit(aggregated["w"]).all())
    new, _ = server_step(sgd(1.0), params, aggregated, EmptyState())
    assert not bool(torch.signbit(new["w"]).any())
    assert not tree.trees_equal(new, aggregated)
    assert _equal_up_to_the_sign_of_zero(new, aggregated)


@FEW
@given(data=_global_and_batch([torch.float32, torch.bfloat16], max_abs=1e3))
def test_sgd_one_on_the_mean_delta_is_fedavg_bitwise_for_close_magnitudes(
    data: tuple[dict[str, torch.Tensor], testing.ClientBatch],
) -> None:
    params, batch = data
    aggregated = mean(batch.trees, batch.weights)
    new, _ = server_step(sgd(1.0), params, aggregated, EmptyState())
    if _close_magnitudes(params, aggregated):
        assert tree.trees_equal(new, aggregated)
    else:  # e.g. 2e-16 next to 3.0: the float64 delta itself is rounded
        _assert_within_an_ulp(new, params, aggregated)


@FEW
@given(data=_global_and_batch(testing.FLOAT_DTYPES, max_abs=None))
def test_sgd_one_on_the_mean_delta_is_fedavg_within_an_ulp(
    data: tuple[dict[str, torch.Tensor], testing.ClientBatch],
) -> None:
    params, batch = data
    aggregated = mean(batch.trees, batch.weights)
    new, _ = server_step(sgd(1.0), params, aggregated, EmptyState())
    _assert_within_an_ulp(new, params, aggregated)


def _assert_within_an_ulp(new: tree.Params, params: tree.Params, aggregated: tree.Params) -> None:
    """|new - aggregated| <= eps(dtype) * max(|params|, |aggregated|), coordinate-wise."""
    for name, p in params.items():
        got, want = new[name].to(torch.float64), aggregated[name].to(torch.float64)
        scale = torch.maximum(p.to(torch.float64).abs(), want.abs())
        eps = torch.finfo(p.dtype).eps
        assert bool(((got - want).abs() <= eps * scale).all()), name


def test_sgd_one_exact_limit_example() -> None:
    # Full 24-bit mantissas 40 binades apart: aggregated - params needs 64 bits, so the float64
    # delta is rounded and params + delta misses the aggregated value by ~1e-16.
    x = 1.0 + 2.0**-23
    m = 2.0**-40 * x
    params = {"w": torch.tensor([x, 3.0])}
    aggregated = {"w": torch.tensor([m, 2.0**-20])}
    new, _ = server_step(sgd(1.0), params, aggregated, EmptyState())
    assert new["w"][1].item() == 2.0**-20  # 1.5 * 2 ** 1 and 2 ** -20: exact
    assert new["w"][0].item() != m
    assert abs(new["w"][0].item() - m) <= 2.0**-52


# --------------------------------------------------------------------------------------------
# Equivalences between transforms


@st.composite
def _delta_sequences(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    structure = draw(testing.tree_structures())
    params = draw(testing.trees_like(structure))
    steps = draw(st.integers(1, 4))
    deltas = [round_delta(draw(testing.trees_like(structure)), params) for _ in range(steps)]
    return params, deltas


def _run(
    transform: ServerTransform[Any], params: tree.Params, deltas: Sequence[tree.Params]
) -> list[dict[str, torch.Tensor]]:
    state = transform.init(params)
    updates: list[dict[str, torch.Tensor]] = []
    for delta in deltas:
        update, state = transform.update(delta, state, params)
        updates.append(update)
    return updates


@FEW
@given(data=_delta_sequences(), lr=st.floats(1e-3, 10))
def test_momentum_with_beta_zero_is_sgd(
    data: tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]], lr: float
) -> None:
    params, deltas = data
    for got, want in zip(
        _run(momentum(lr, 0.0), params, deltas), _run(sgd(lr), params, deltas), strict=True
    ):
        assert got.keys() == want.keys()
        # Equal values; only the sign of a zero may differ (0 * v + -0.0 is +0.0).
        assert all(torch.equal(got[n], want[n]) for n in want)


@FEW
@given(data=_delta_sequences())
def test_chain_of_sgd_one_is_sgd_one_bitwise(
    data: tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]],
) -> None:
    params, deltas = data
    for got, want in zip(
        _run(chain(sgd(1.0)), params, deltas), _run(sgd(1.0), params, deltas), strict=True
    ):
        assert tree.trees_equal(got, want)
    for got, want in zip(
        _run(chain(sgd(0.5), sgd(4.0)), params, deltas),
        _run(sgd(2.0), params, deltas),
        strict=True,
    ):
        assert tree.trees_equal(got, want)


def test_momentum_accumulates_velocity() -> None:
    params = {"w": torch.zeros(2)}
    delta = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    updates = _run(momentum(0.5, 0.5), params, [delta] * 3)
    # v = 1, 1.5, 1.75 (times the delta); update = 0.5 * v
    assert [u["w"].tolist() for u in updates] == [[0.5, -1.0], [0.75, -1.5], [0.875, -1.75]]


# --------------------------------------------------------------------------------------------
# Golden values: Algorithm 2 of Reddi et al. (2021), recomputed with plain Python floats


DELTAS = [[0.5, -1.0, 0.0], [0.25, 2.0, 0.1], [-1.0, 0.0, -0.3]]


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def _reference(
    rule: str, lr: float, b1: float, b2: float, tau: float
) -> list[tuple[list[float], list[float], list[float]]]:
    """(update, m, v) after each step, coordinate by coordinate, in Python floats."""
    m = [0.0] * 3
    v = [tau * tau] * 3
    out: list[tuple[list[float], list[float], list[float]]] = []
    for step in DELTAS:
        update: list[float] = []
        for i, d in enumerate(step):
            m[i] = b1 * m[i] + (1 - b1) * d
            if rule == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            elif rule == "yogi":
                v[i] = v[i] - (1 - b2) * d * d * _sign(v[i] - d * d)
            else:
                v[i] = v[i] + d * d
            update.append(lr * m[i] / (math.sqrt(v[i]) + tau))
        out.append((update, list(m), list(v)))
    return out


@pytest.mark.parametrize(
    ("rule", "transform", "hyper"),
    [
        ("adam", adam(0.1), (0.1, 0.9, 0.99, 1e-3)),
        ("adam", adam(0.3, b1=0.5, b2=0.9, tau=0.5), (0.3, 0.5, 0.9, 0.5)),
        ("yogi", yogi(0.1), (0.1, 0.9, 0.99, 1e-3)),
        # tau = 0.5: v starts at 0.25 = 0.5 ** 2, so the first step hits sign(0) = 0.
        ("yogi", yogi(0.3, b1=0.5, b2=0.9, tau=0.5), (0.3, 0.5, 0.9, 0.5)),
        ("adagrad", adagrad(0.1), (0.1, 0.0, 0.0, 1e-3)),
        ("adagrad", adagrad(0.2, tau=0.1, b1=0.9), (0.2, 0.9, 0.0, 0.1)),
    ],
)
def test_adaptive_golden_values(
    rule: str, transform: ServerTransform[AdaptiveState], hyper: tuple[float, ...]
) -> None:
    lr, b1, b2, tau = hyper
    expected = _reference(rule, lr, b1, b2, tau)
    params = {"w": torch.zeros(3)}
    state = transform.init(params)
    assert state.m["w"].tolist() == [0.0] * 3
    assert state.v["w"].tolist() == [tau * tau] * 3
    for step, (want_update, want_m, want_v) in zip(DELTAS, expected, strict=True):
        delta = {"w": torch.tensor(step, dtype=torch.float64)}
        update, state = transform.update(delta, state, params)
        assert update["w"].tolist() == pytest.approx(want_update, rel=1e-14, abs=0)
        assert state.m["w"].tolist() == pytest.approx(want_m, rel=1e-14, abs=0)
        assert state.v["w"].tolist() == pytest.approx(want_v, rel=1e-14, abs=0)
        assert state.m["w"].dtype == state.v["w"].dtype == torch.float64


def test_yogi_sign_zero_keeps_v() -> None:
    opt = yogi(1.0, tau=0.5)
    _, state = opt.update(
        {"w": torch.tensor([0.5], dtype=torch.float64)}, opt.init({"w": torch.zeros(1)}), {}
    )
    assert state.v["w"].item() == 0.25


def test_adaptive_update_is_returned_in_the_delta_dtype_and_state_in_float64() -> None:
    params = {"w": torch.zeros(2, dtype=torch.float16)}
    opt = adam(0.1)
    update, state = opt.update({"w": torch.tensor([0.5, -1.0])}, opt.init(params), params)
    assert update["w"].dtype == torch.float32
    assert state.v["w"].dtype == torch.float64
    new, _ = server_step(opt, params, {"w": torch.ones(2, dtype=torch.float16)}, opt.init(params))
    assert new["w"].dtype == torch.float16


# --------------------------------------------------------------------------------------------
# Non-floating entries, purity, pickling


@pytest.mark.parametrize("name", TRANSFORMS)
def test_non_floating_entries_take_the_aggregated_value(name: str) -> None:
    transform = TRANSFORMS[name]
    params = {"w": torch.ones(2), "n": torch.tensor(3), "u": torch.tensor([7], dtype=torch.uint8)}
    aggregated = {
        "w": torch.zeros(2),
        "n": torch.tensor(10),
        "u": torch.tensor([2], dtype=torch.uint8),
    }
    new, _ = server_step(transform, params, aggregated, transform.init(params))
    assert new["n"].item() == 10
    assert new["n"].dtype == torch.int64
    assert new["u"].tolist() == [2]
    assert new["u"].dtype == torch.uint8
    assert new["w"].dtype == torch.float32


@pytest.mark.parametrize("name", TRANSFORMS)
@settings(max_examples=10)
@given(data=_delta_sequences())
def test_transforms_never_mutate_and_pickle(
    name: str, data: tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]
) -> None:
    transform = TRANSFORMS[name]
    params, deltas = data
    params_before = tree.digest(params)
    state = transform.init(params)
    for delta in deltas:
        delta_before, state_before = tree.digest(delta), _state_digests(state)
        restored_transform = pickle.loads(pickle.dumps(transform))
        restored_state = pickle.loads(pickle.dumps(state))
        update, new_state = transform.update(delta, state, params)
        again, again_state = restored_transform.update(delta, restored_state, params)
        assert tree.trees_equal(update, again)
        assert _state_digests(new_state) == _state_digests(again_state)
        assert tree.digest(delta) == delta_before
        assert _state_digests(state) == state_before
        assert tree.digest(params) == params_before
        assert all(update[n] is not delta[n] for n in delta)
        state = new_state


def test_records_and_types() -> None:
    params = {"w": torch.zeros(2)}
    assert isinstance(momentum(1.0, 0.5).init(params), MomentumState)
    assert isinstance(adam(1.0).init(params), AdaptiveState)
    state = chain(sgd(1.0), adam(1.0)).init(params)
    assert isinstance(state, ChainState)
    assert isinstance(state.states[0], EmptyState)
    assert isinstance(state.states[1], AdaptiveState)
    assert chain(sgd(1.0)) == Chain((sgd(1.0),))
    assert pickle.loads(pickle.dumps(adam(0.1, tau=0.5))) == adam(0.1, tau=0.5)


def test_apply_updates_and_round_delta() -> None:
    params = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    delta = round_delta({"w": torch.tensor([1.5, 0.0]), "n": torch.tensor(1)}, params)
    assert delta["w"].dtype == torch.float64
    assert delta["n"].dtype == torch.int64
    assert delta["w"].tolist() == [0.5, -2.0]
    assert delta["n"].item() == -3
    new = apply_updates(params, delta)
    assert new["w"].tolist() == [1.5, 0.0]
    assert new["n"].item() == 1
    assert params["w"].tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------------------------
# Preconditions


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: sgd(0.0), "lr.*0.0"),
        (lambda: sgd(-1.0), "lr.*-1.0"),
        (lambda: sgd(math.nan), "lr.*nan"),
        (lambda: sgd(True), "lr.*True"),
        (lambda: momentum(1.0, 1.0), "beta.*1.0"),
        (lambda: momentum(1.0, -0.1), "beta.*-0.1"),
        (lambda: adam(1.0, b1=1.0), "b1.*1.0"),
        (lambda: adam(1.0, b2=-0.5), "b2.*-0.5"),
        (lambda: adam(1.0, tau=0.0), "tau.*0.0"),
        (lambda: yogi(math.inf), "lr.*inf"),
        (lambda: adagrad(1.0, tau=-1.0), "tau.*-1.0"),
        (lambda: adagrad(1.0, b1=2.0), "b1.*2.0"),
    ],
)
def test_hyperparameters_are_validated(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_chain_rejects_non_transforms() -> None:
    with pytest.raises(TypeError, match=r"transforms\[1\]"):
        chain(sgd(1.0), 3)  # type: ignore[arg-type]


def test_state_must_match_the_delta() -> None:
    params = {"w": torch.zeros(2)}
    for opt in (momentum(1.0, 0.5), adam(1.0)):
        state = opt.init(params)
        with pytest.raises(ValueError, match="'v'"):
            opt.update({"v": torch.zeros(2)}, state, params)
        with pytest.raises(ValueError, match=r"'w'.*\(3,\).*\(2,\)"):
            opt.update({"w": torch.zeros(3)}, state, params)
    opt = chain(sgd(1.0), sgd(1.0))
    with pytest.raises(ValueError, match="2 transforms got 1 states"):
        opt.update(params, ChainState(states=(EmptyState(),)), params)


def test_tree_preconditions() -> None:
    with pytest.raises(ValueError, match=r"names.*'v'"):
        round_delta({"v": torch.zeros(1)}, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'w'.*\(2,\).*\(1,\)"):
        round_delta({"w": torch.zeros(2)}, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'w'.*\(2,\).*\(1,\)"):
        apply_updates({"w": torch.zeros(1)}, {"w": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"'n'.*int64.*float32"):
        apply_updates({"n": torch.tensor(1)}, {"n": torch.tensor(0.5)})
    with pytest.raises(TypeError, match=r"'c'.*complex"):
        round_delta({"c": torch.zeros(1, dtype=torch.complex64)}, {"c": torch.zeros(1)})
