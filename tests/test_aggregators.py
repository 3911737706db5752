"""Aggregators: hypothesis properties (through `blazefl_fn.testing.aggregators`), golden values,
errors.

Exactness, measured by these properties:

- `median`, `TrimmedMean` and `Krum` are exactly invariant to the clients' order, exact on
  equal inputs, within the inputs' range, and ignore weights (bitwise).
- `mean` (= `tree.weighted_mean`) sums in the order given: reordering clients or scaling
  weights moves a result by at most 1 ulp of its dtype, measured against the largest input
  magnitude at that coordinate (float64 entries: up to n ulps). Equal inputs and the range hold
  exactly for dtypes narrower than float64 (float64: n ulps, as weights are applied before the
  sum, so subnormals underflow). Doubling a weight equals listing the client twice exactly for
  the first client only (float64: up to subnormal underflow); elsewhere within n ulps.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn import tree
from blazefl_fn.server import aggregators
from blazefl_fn.server.aggregators import (
    Krum,
    TrimmedMean,
    clip_by_norm,
    global_norm,
    krum,
    krum_scores,
    mean,
    median,
    trimmed_mean,
)
from blazefl_fn.testing import aggregators as testing

NARROW = (torch.float32, torch.float16, torch.bfloat16)
FEW = settings(max_examples=25)

# Robust aggregators and the fewest clients they accept.
ROBUST: dict[str, tuple[aggregators.Aggregator, int]] = {
    "median": (median, 1),
    "trimmed": (trimmed_mean(0.3), 1),
    "krum": (krum(0), 3),
    "multikrum": (krum(1, m=3), 5),
}
ALL: dict[str, tuple[aggregators.Aggregator, int]] = {"mean": (mean, 1), **ROBUST}


@st.composite
def _batches(draw: st.DrawFn, min_clients: int, **kwargs: Any) -> testing.ClientBatch:
    """Batches of ``min_clients`` to ``min_clients + 1`` positive-weight clients, plus up to two
    zero-weight clients at drawn positions."""
    base = draw(
        testing.client_batches(
            min_clients=min_clients, max_clients=min_clients + 1, zero_weights=False, **kwargs
        )
    )
    trees, weights = list(base.trees), list(base.weights)
    structure = _structure(trees[0])
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(trees)))
        trees.insert(at, draw(testing.trees_like(structure, max_abs=kwargs.get("max_abs", 1e3))))
        weights.insert(at, 0.0)
    return testing.ClientBatch(trees=tuple(trees), weights=tuple(weights))


def _ids(params: dict[str, tuple[aggregators.Aggregator, int]]) -> list[str]:
    return list(params)


# --------------------------------------------------------------------------------------------
# Properties shared by every aggregator


@pytest.mark.parametrize(("agg", "least"), ALL.values(), ids=_ids(ALL))
@FEW
@given(data=st.data())
def test_structure_preserved_and_deterministic(
    agg: aggregators.Aggregator, least: int, data: st.DataObject
) -> None:
    batch = data.draw(_batches(least))
    testing.check_structure_preserved(agg, batch.trees, batch.weights)
    testing.check_deterministic(agg, batch.trees, batch.weights)


@pytest.mark.parametrize(("agg", "least"), ALL.values(), ids=_ids(ALL))
@FEW
@given(data=st.data())
def test_zero_weight_client_changes_nothing(
    agg: aggregators.Aggregator, least: int, data: st.DataObject
) -> None:
    batch = data.draw(_batches(least))
    testing.check_zero_weight_client(agg, batch.trees, batch.weights)
    extra = data.draw(testing.params_trees(_structure(batch.trees[0]), max_abs=None))
    testing.check_zero_weight_client(agg, batch.trees, batch.weights, extra)


@pytest.mark.parametrize(("agg", "least"), ALL.values(), ids=_ids(ALL))
@settings(max_examples=10)
@given(data=st.data())
def test_all_zero_weights_raise(
    agg: aggregators.Aggregator, least: int, data: st.DataObject
) -> None:
    batch = data.draw(_batches(least))
    testing.check_rejects_all_zero_weights(agg, batch.trees)


def _structure(params: tree.Params) -> testing.TreeStructure:
    return testing.TreeStructure(
        entries=tuple((n, tuple(t.shape), t.dtype) for n, t in params.items())
    )


# --------------------------------------------------------------------------------------------
# Robust aggregators: exact properties


@pytest.mark.parametrize(("agg", "least"), ROBUST.values(), ids=_ids(ROBUST))
@FEW
@given(data=st.data())
def test_robust_exact_properties(
    agg: aggregators.Aggregator, least: int, data: st.DataObject
) -> None:
    batch = data.draw(_batches(least))
    testing.check_permutation_invariance(agg, batch.trees, batch.weights)
    testing.check_coordinate_bounds(agg, batch.trees, batch.weights)
    testing.check_weight_scaling(agg, batch.trees, batch.weights, factor=0.37)
    testing.check_identity_on_equal(agg, batch.trees[0], batch.weights)


@pytest.mark.parametrize(("agg", "least"), ROBUST.values(), ids=_ids(ROBUST))
@FEW
@given(data=st.data())
def test_robust_permutation_invariance_any_order(
    agg: aggregators.Aggregator, least: int, data: st.DataObject
) -> None:
    batch = data.draw(_batches(least, max_abs=None))
    order = data.draw(st.permutations(range(len(batch.trees))))
    testing.check_permutation_invariance(agg, batch.trees, batch.weights, permutations=[order])


@pytest.mark.parametrize(("agg", "least"), ROBUST.values(), ids=_ids(ROBUST))
@FEW
@given(data=st.data(), a=st.floats(-10, 10), b=st.floats(-100, 100))
def test_robust_affine_equivariance(
    agg: aggregators.Aggregator, least: int, data: st.DataObject, a: float, b: float
) -> None:
    batch = data.draw(_batches(least))
    if isinstance(agg, Krum):
        # Rounding a*x+b can reorder close Krum scores and ties are broken by the trees' bytes,
        # which an affine map reorders: exact for powers of two when no two scores tie.
        kept = [t for t, w in zip(batch.trees, batch.weights, strict=True) if w > 0]
        a, b = data.draw(st.sampled_from([1.0, -1.0, 2.0, -2.0])), 0.0
        if len(set(krum_scores(kept, agg.f))) == len(kept):
            # Multi-Krum averages each coordinate's values in ascending order; a negative a
            # reverses that order, so the float64 sum of m values may round differently (found
            # by hypothesis: 3 values, 2.6 ulps). Two ulps per value of slack.
            ulps = 0 if agg.m == 1 else 2 * agg.m
            testing.check_affine_equivariance(agg, batch.trees, batch.weights, a, b, ulps=ulps)
    else:
        testing.check_affine_equivariance(agg, batch.trees, batch.weights, a, b, ulps=2)


def test_odd_median_is_exactly_affine_equivariant() -> None:
    trees = [{"w": torch.tensor([v, -v, 3 * v])} for v in (0.1, 7.3, -2.2)]
    testing.check_affine_equivariance(median, trees, [1, 1, 1], a=-3.7, b=0.3)


# --------------------------------------------------------------------------------------------
# Robustness


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.34, 0.49])
@FEW
@given(data=st.data())
def test_trimmed_mean_stays_in_honest_range(beta: float, data: st.DataObject) -> None:
    agg = trimmed_mean(beta)
    batch = data.draw(testing.client_batches(min_clients=2, max_clients=9, zero_weights=False))
    corrupted = data.draw(testing.adversarial_replacements(batch, agg.trimmed(len(batch.trees))))
    testing.check_honest_bounds(
        agg, corrupted.batch.trees, corrupted.batch.weights, corrupted.honest()
    )


@FEW
@given(data=st.data())
def test_median_stays_in_honest_range(data: st.DataObject) -> None:
    batch = data.draw(testing.client_batches(min_clients=1, max_clients=8))
    n = len(batch.positive())
    corrupted = data.draw(testing.adversarial_replacements(batch, (n - 1) // 2))
    testing.check_honest_bounds(
        median, corrupted.batch.trees, corrupted.batch.weights, corrupted.honest()
    )


@pytest.mark.parametrize(("f", "m"), [(0, 1), (1, 1), (2, 1), (1, 3), (2, 2)])
@FEW
@given(data=st.data())
def test_krum_ignores_far_byzantine_clients(f: int, m: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(2 * f + 3, 2 * f + 5))
    batch = data.draw(
        testing.client_batches(
            min_clients=n, max_clients=n, zero_weights=False, dtypes=[torch.float32]
        )
    )
    bad = data.draw(st.lists(st.integers(0, n - 1), min_size=f, max_size=f, unique=True))
    signs = data.draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=f, max_size=f))
    trees = list(batch.trees)
    for i, sign in zip(bad, signs, strict=True):
        trees[i] = {name: torch.full_like(t, sign * 1e30) for name, t in trees[i].items()}
    honest = [i for i in range(n) if i not in bad]
    agg = krum(f, m)
    if m == 1:
        chosen = tree.digest(agg(trees, batch.weights))
        assert chosen in {tree.digest(trees[i]) for i in honest}
    testing.check_honest_bounds(agg, trees, batch.weights, honest)


@pytest.mark.parametrize("f", [0, 1])
@FEW
@given(data=st.data())
def test_krum_returns_an_input_bitwise(f: int, data: st.DataObject) -> None:
    batch = data.draw(_batches(2 * f + 3, max_abs=None))
    testing.check_selects_an_input(krum(f), batch.trees, batch.weights)


# --------------------------------------------------------------------------------------------
# The weighted mean


@FEW
@given(batch=testing.client_batches(max_clients=6))
def test_mean_is_tree_weighted_mean_bitwise(batch: testing.ClientBatch) -> None:
    expected = tree.weighted_mean(batch.trees, batch.weights)
    assert tree.trees_equal(mean(batch.trees, batch.weights), expected)


@FEW
@given(batch=testing.client_batches(max_clients=6, dtypes=NARROW))
def test_mean_exact_properties_below_float64(batch: testing.ClientBatch) -> None:
    testing.check_coordinate_bounds(mean, batch.trees, batch.weights)
    testing.check_identity_on_equal(mean, batch.trees[0], batch.weights)
    testing.check_weight_two_equals_two_copies(mean, batch.trees, batch.weights, index=0)


@FEW
@given(batch=testing.client_batches(max_clients=6, dtypes=[torch.float64]))
def test_mean_float64_properties_within_ulps(batch: testing.ClientBatch) -> None:
    n = len(batch.trees)
    testing.check_coordinate_bounds(mean, batch.trees, batch.weights, ulps=n)
    testing.check_identity_on_equal(mean, batch.trees[0], batch.weights, ulps=n)
    # Not exact: w / total * x underflows for float64 subnormals (5e-324 / 2 -> 0).
    testing.check_weight_two_equals_two_copies(mean, batch.trees, batch.weights, index=0, ulps=1)


@FEW
@given(batch=testing.client_batches(max_clients=6), index=st.integers(0, 5))
def test_mean_weight_two_is_two_copies_within_ulps(batch: testing.ClientBatch, index: int) -> None:
    # Exact only for the first client: later, acc + 2qx and (acc + qx) + qx round differently
    # (e.g. weights [3, 2] vs [3, 1, 1] on a float64 value 2 then 1: 1.6 vs 1.5999999999999999).
    index %= len(batch.trees)
    n = len(batch.trees) + 1
    testing.check_weight_two_equals_two_copies(
        mean, batch.trees, batch.weights, index=index, ulps=n
    )


@FEW
@given(batch=testing.client_batches(max_clients=6, dtypes=NARROW), factor=st.floats(1e-3, 1e3))
def test_mean_order_and_scale_within_one_ulp(batch: testing.ClientBatch, factor: float) -> None:
    testing.check_permutation_invariance(mean, batch.trees, batch.weights, ulps=1)
    testing.check_weight_scaling(mean, batch.trees, batch.weights, factor, ulps=1)


@FEW
@given(batch=testing.client_batches(max_clients=6, dtypes=[torch.float64]))
def test_mean_float64_order_within_ulps(batch: testing.ClientBatch) -> None:
    n = len(batch.trees)
    testing.check_permutation_invariance(mean, batch.trees, batch.weights, ulps=n)
    testing.check_weight_scaling(mean, batch.trees, batch.weights, 7.0, ulps=n)


@FEW
@given(
    batch=testing.client_batches(max_clients=6, dtypes=[torch.float32, torch.float64]),
    a=st.floats(-10, 10),
    b=st.floats(-100, 100),
)
def test_mean_affine_equivariance(batch: testing.ClientBatch, a: float, b: float) -> None:
    n = len(batch.trees)
    testing.check_affine_equivariance(mean, batch.trees, batch.weights, a, b, ulps=n + 2)


# --------------------------------------------------------------------------------------------
# Golden values and edge cases


def test_median_golden_values() -> None:
    trees = [{"w": torch.tensor([4.0, 1.0]), "n": torch.tensor(3)} for _ in range(1)]
    trees += [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}]
    trees += [{"w": torch.tensor([2.0, 8.0]), "n": torch.tensor(8)}]
    trees += [{"w": torch.tensor([9.0, 0.5]), "n": torch.tensor(11)}]
    out = median(trees, [1, 2, 3, 4])
    assert out["w"].tolist() == [3.0, 1.5]
    assert out["n"].item() == 6  # (4 + 8) / 2
    assert out["n"].dtype == torch.int64
    out = median(trees[:3], [1, 1, 1])
    assert out["w"].tolist() == [2.0, 2.0]
    assert out["n"].item() == 4


def test_integer_midpoints_round_half_to_even() -> None:
    trees = [{"n": torch.tensor([1, 2, -3])}, {"n": torch.tensor([2, 5, -4])}]
    assert median(trees, [1, 1])["n"].tolist() == [2, 4, -4]
    assert trimmed_mean(0.0)(trees, [1, 1])["n"].tolist() == [2, 4, -4]


def test_integer_extremes_saturate_instead_of_wrapping() -> None:
    top = torch.iinfo(torch.int64).max
    trees = [{"n": torch.tensor(top)}, {"n": torch.tensor(top)}]
    assert median(trees, [1, 1])["n"].item() > 0


def test_median_zero_sign_does_not_depend_on_order() -> None:
    trees = [{"w": torch.tensor([-0.0])}, {"w": torch.tensor([0.0])}, {"w": torch.tensor([0.0])}]
    results = {
        tree.digest(median([trees[i] for i in order], [1, 1, 1]))
        for order in ([0, 1, 2], [1, 0, 2], [1, 2, 0])
    }
    assert len(results) == 1
    assert not median([trees[0]] * 3, [1, 1, 1])["w"].signbit().any()


def test_even_median_of_huge_float64_does_not_overflow() -> None:
    big = torch.finfo(torch.float64).max
    trees = [{"w": torch.tensor([big], dtype=torch.float64)} for _ in range(2)]
    assert median(trees, [1, 1])["w"].item() == big
    assert trimmed_mean(0.0)(trees * 2, [1] * 4)["w"].item() == big
    trees.append({"w": torch.tensor([-big], dtype=torch.float64)})
    assert median(trees[1:], [1, 1])["w"].item() == 0.0
    assert trimmed_mean(0.0)(trees, [1, 1, 1])["w"].item() == pytest.approx(big / 3)


def test_trimmed_mean_golden_values() -> None:
    values = (-50.0, 1.0, 2.0, 3.0, 4.0, 1e9)
    trees = [{"w": torch.tensor([v])} for v in values]
    assert trimmed_mean(0.2)(trees, [1.0] * 6)["w"].item() == 2.5  # drops 1 each side
    assert trimmed_mean(0.34)(trees, [1.0] * 6)["w"].item() == 2.5  # floor(2.04) = 2
    assert trimmed_mean(0.0)(trees, [1.0] * 6)["w"].item() == pytest.approx(
        sum(values) / 6, rel=1e-7
    )
    # The zero-weight client is dropped before trimming.
    assert trimmed_mean(0.2)(trees, [0.0, 1, 1, 1, 1, 1])["w"].item() == 3.0


def test_trimmed_count_reads_beta_as_printed() -> None:
    assert TrimmedMean(0.29).trimmed(100) == 29
    assert TrimmedMean(0.3).trimmed(10) == 3
    assert TrimmedMean(0.49).trimmed(3) == 1
    assert TrimmedMean(0.0).trimmed(7) == 0


def test_krum_golden_values() -> None:
    trees = [{"w": torch.tensor([v, 0.0]), "n": torch.tensor(int(v))} for v in (0, 1, 3, 10)]
    assert krum_scores(trees, 0) == [10.0, 5.0, 13.0, 130.0]
    assert krum_scores(trees, 0) == krum_scores(trees[::-1], 0)[::-1]
    chosen = krum(0)(trees, [1, 1, 1, 1])
    assert tree.trees_equal(chosen, trees[1])
    assert chosen["w"] is not trees[1]["w"]
    multi = krum(0, m=3)(trees, [1, 1, 1, 1])
    assert multi["w"].tolist() == pytest.approx([4.0 / 3.0, 0.0])
    assert multi["n"].item() == 1  # round(4 / 3)
    # The non-floating entry plays no part in the distances.
    assert krum_scores([{**t, "n": torch.tensor(10**6 * i)} for i, t in enumerate(trees)], 0) == [
        10.0,
        5.0,
        13.0,
        130.0,
    ]


def test_krum_ties_are_broken_by_content_not_position() -> None:
    trees = [{"w": torch.tensor([v])} for v in (-1.0, 0.0, 1.0)]
    assert krum_scores(trees, 0) == [1.0, 1.0, 1.0]
    # float32 bytes (little endian): 0.0 = 00000000 < 1.0 = 0000803f < -1.0 = 000080bf
    assert Krum(0, 2).select(trees) == [1, 2]
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        chosen = krum(0)([trees[i] for i in order], [1, 1, 1])
        assert tree.trees_equal(chosen, trees[1])
    twins = [{"w": torch.tensor([v])} for v in (5.0, 5.0, 9.0, 1.0)]
    assert Krum(0, 2).select(twins) == [0, 1]  # identical trees: lowest index first


def test_krum_drops_zero_weight_clients_before_counting() -> None:
    trees = [{"w": torch.tensor([float(v)])} for v in range(5)]
    assert krum(1)(trees, [1] * 5)["w"].item() == 2.0
    with pytest.raises(ValueError, match=r"n=4, f=1"):
        krum(1)(trees, [1, 1, 0, 1, 1])


def test_mean_matches_fedavg_golden() -> None:
    trees = [{"w": torch.tensor([4.0, 0.0])}, {"w": torch.tensor([0.0, 8.0])}]
    assert mean(trees, [1, 3])["w"].tolist() == [1.0, 6.0]


@given(batch=testing.client_batches(max_clients=4))
@settings(max_examples=10)
def test_aggregators_pickle(batch: testing.ClientBatch) -> None:
    for agg, _ in ALL.values():
        restored = pickle.loads(pickle.dumps(agg))
        if len(batch.positive()) >= 5 or not isinstance(agg, Krum):
            assert tree.trees_equal(
                restored(batch.trees, batch.weights), agg(batch.trees, batch.weights)
            )
    assert pickle.loads(pickle.dumps(TrimmedMean(0.25))) == TrimmedMean(0.25)
    assert pickle.loads(pickle.dumps(Krum(2, 3))) == Krum(2, 3)


# --------------------------------------------------------------------------------------------
# Clipping


@FEW
@given(
    params=testing.params_trees(dtypes=[torch.float32, torch.float64]),
    max_norm=st.floats(1e-3, 1e4),
)
def test_clip_by_norm_bounds_the_norm(params: dict[str, torch.Tensor], max_norm: float) -> None:
    before = tree.digest(params)
    norm = global_norm(params)
    clipped = clip_by_norm(params, max_norm)
    assert tree.digest(params) == before
    if norm <= max_norm:
        assert tree.trees_equal(clipped, params)
    else:
        assert global_norm(clipped) == pytest.approx(max_norm, rel=1e-6)
        for name, t in params.items():  # the direction is kept
            expected = t.to(torch.float64) * (max_norm / norm)
            assert torch.allclose(clipped[name].to(torch.float64), expected, rtol=1e-6)
    assert all(clipped[n] is not params[n] for n in params)


def test_clip_by_norm_golden_and_integer_entries() -> None:
    params = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}
    clipped = clip_by_norm(params, 1.0)
    assert clipped["w"].tolist() == pytest.approx([0.6, 0.8])
    assert clipped["n"].item() == 7
    assert clip_by_norm(params, 5.0)["w"].tolist() == [3.0, 4.0]


def test_global_norm_of_huge_float64_does_not_overflow() -> None:
    big = {"w": torch.tensor([1e200, -1e200], dtype=torch.float64)}
    assert global_norm(big) == pytest.approx(math.sqrt(2) * 1e200)
    assert global_norm({}) == 0.0
    assert global_norm({"e": torch.zeros(0)}) == 0.0


def test_global_norm_does_not_depend_on_thread_count() -> None:
    values = {"w": torch.randn(300_000, generator=torch.Generator().manual_seed(0))}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = global_norm(values)
        torch.set_num_threads(max(2, threads))
        many = global_norm(values)
    finally:
        torch.set_num_threads(threads)
    assert one == many
    reference = math.sqrt(math.fsum(v * v for v in values["w"].to(torch.float64).tolist()))
    assert one == pytest.approx(reference, rel=1e-14)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_clip_by_norm_rejects_bad_bounds(bad: float) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_norm({"w": torch.ones(1)}, bad)


def test_clip_by_norm_rejects_non_numbers_and_non_finite_trees() -> None:
    with pytest.raises(TypeError, match="max_norm"):
        clip_by_norm({"w": torch.ones(1)}, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_norm"):
        clip_by_norm({"w": torch.ones(1)}, True)
    with pytest.raises(ValueError, match="'w'"):
        clip_by_norm({"w": torch.tensor([math.inf])}, 1.0)


# --------------------------------------------------------------------------------------------
# Preconditions


ONE = {"w": torch.zeros(2)}


@pytest.mark.parametrize("agg", [a for a, _ in ALL.values()], ids=_ids(ALL))
def test_preconditions_raise_with_the_value(agg: aggregators.Aggregator) -> None:
    five = [ONE] * 5
    with pytest.raises(ValueError, match="empty"):
        agg([], [])
    with pytest.raises(ValueError, match="5 trees but 4 weights"):
        agg(five, [1] * 4)
    with pytest.raises(ValueError, match=r"weights\[1\].*-1"):
        agg(five, [1, -1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"weights\[0\].*nan"):
        agg(five, [math.nan, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"weights\[0\].*inf"):
        agg(five, [math.inf, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="all weights are zero"):
        agg(five, [0] * 5)
    with pytest.raises(TypeError, match=r"weights\[2\].*True"):
        agg(five, [1, 1, True, 1, 1])
    with pytest.raises(TypeError, match=r"weights\[0\].*'1'"):
        agg(five, ["1", 1, 1, 1, 1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"trees\[3\].*names.*'v'"):
        agg([*[ONE] * 3, {"v": torch.zeros(2)}, ONE], [1] * 5)
    with pytest.raises(ValueError, match=r"'w'.*trees\[2\].*\(3,\).*\(2,\)"):
        agg([ONE, ONE, {"w": torch.zeros(3)}, ONE, ONE], [1] * 5)
    with pytest.raises(ValueError, match=r"'w'.*trees\[1\].*float64"):
        agg([ONE, {"w": torch.zeros(2, dtype=torch.float64)}, ONE, ONE, ONE], [1] * 5)
    with pytest.raises(TypeError, match=r"trees\[1\]\['w'\].*tensor"):
        agg([ONE, {"w": [0.0, 0.0]}, ONE, ONE, ONE], [1] * 5)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"trees\[0\].*mapping"):
        agg([3, ONE, ONE, ONE, ONE], [1] * 5)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence of parameter trees"):
        agg(ONE, [1])  # type: ignore[arg-type]


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, math.nan, True, "0.1"])
def test_trimmed_mean_rejects_beta(beta: object) -> None:
    with pytest.raises(ValueError, match=f"beta.*{beta!r}"):
        trimmed_mean(beta)  # type: ignore[arg-type]


@pytest.mark.parametrize(("f", "m", "match"), [(-1, 1, "f.*-1"), (0, 0, "m.*0"), (1.5, 1, "f")])
def test_krum_rejects_hyperparameters(f: object, m: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        krum(f, m)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "f"), [(1, 0), (2, 0), (4, 1), (6, 2)])
def test_krum_needs_more_than_2f_plus_2_clients(n: int, f: int) -> None:
    trees = [{"w": torch.tensor([float(i)])} for i in range(n)]
    with pytest.raises(ValueError, match=rf"n > 2f \+ 2.*n={n}, f={f}"):
        krum(f)(trees, [1] * n)
    with pytest.raises(ValueError, match=rf"n={n}, f={f}"):
        krum_scores(trees, f)


def test_krum_m_at_most_n() -> None:
    trees = [{"w": torch.tensor([float(i)])} for i in range(3)]
    with pytest.raises(ValueError, match="m=4, n=3"):
        krum(0, m=4)(trees, [1, 1, 1])
    assert krum(0, m=3)(trees, [1, 1, 1])["w"].item() == 1.0
