"""The testing module itself: every check passes on a sound aggregator and fails on a broken one
(so none is vacuous), tolerances mean what they say, and the strategies draw what they promise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn import tree
from blazefl_fn.server.aggregators import Aggregator, krum, mean, median
from blazefl_fn.testing import aggregators as testing

Params = tree.Params
Result = dict[str, torch.Tensor]

TREES = [
    {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(3)},
    {"w": torch.tensor([4.0, 0.5]), "n": torch.tensor(5)},
    {"w": torch.tensor([-1.0, 8.0]), "n": torch.tensor(1)},
]
WEIGHTS = [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------------------------
# Broken aggregators, one per property


def first_tree(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    """Not permutation invariant."""
    return tree.clone(trees[0])


def shifted_mean(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    """Not the identity on equal inputs, not affine equivariant."""
    out = mean(trees, weights)
    return {n: t + 1 if t.dtype.is_floating_point else t for n, t in out.items()}


def unnormalised_sum(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    """Outside the inputs' range; changes when all weights are scaled."""
    out = tree.weighted_sum(trees, weights)
    return {n: t.to(trees[0][n].dtype) for n, t in out.items()}


def mean_of_all(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    """Lets zero-weight clients in."""
    return mean(trees, [1.0] * len(trees))


def drops_an_entry(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    out = mean(trees, weights)
    del out["n"]
    return out


def changes_dtype(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    return {n: t.to(torch.float64) for n, t in mean(trees, weights).items()}


def mutates_input(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    out = mean(trees, weights)
    trees[0]["w"].add_(1.0)  # type: ignore[index]
    return out


def aliases_input(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    return dict(trees[0])


def returns_input(trees: Sequence[Params], weights: Sequence[float]) -> Params:
    return trees[0]


def returns_a_list(trees: Sequence[Params], weights: Sequence[float]) -> object:
    return [mean(trees, weights)]


_COUNTER = itertools.count()


def drifts(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    """Not deterministic."""
    out = mean(trees, weights)
    out["w"] = out["w"] + next(_COUNTER)
    return out


def silent_on_zero_weights(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    if not any(w > 0 for w in weights):
        return {n: torch.zeros_like(t) for n, t in trees[0].items()}
    return mean(trees, weights)


def wrong_error_on_zero_weights(trees: Sequence[Params], weights: Sequence[float]) -> Result:
    if not any(w > 0 for w in weights):
        raise ZeroDivisionError("oops")
    return mean(trees, weights)


# --------------------------------------------------------------------------------------------
# Each check: passes on a sound aggregator, fails on a broken one


def test_check_structure_preserved() -> None:
    testing.check_structure_preserved(mean, TREES, WEIGHTS)
    testing.check_structure_preserved(krum(0), TREES, WEIGHTS)
    cases = [
        (drops_an_entry, "names differ.*'n'"),
        (changes_dtype, r"'w' is torch.float64.*torch.float32"),
        (mutates_input, r"modified its input trees\[0\]"),
        (aliases_input, "'w' shares memory"),
        (returns_input, r"returned its input trees\[0\] itself"),
        (returns_a_list, "not a mapping"),
    ]
    for broken, match in cases:
        trees = [tree.clone(t) for t in TREES]
        with pytest.raises(AssertionError, match=match):
            testing.check_structure_preserved(broken, trees, WEIGHTS)  # type: ignore[arg-type]


def test_check_deterministic() -> None:
    testing.check_deterministic(median, TREES, WEIGHTS)
    with pytest.raises(AssertionError, match="two calls"):
        testing.check_deterministic(drifts, TREES, WEIGHTS)


def test_check_identity_on_equal() -> None:
    testing.check_identity_on_equal(mean, TREES[0], WEIGHTS)
    testing.check_identity_on_equal(median, TREES[1], [1, 1])
    with pytest.raises(AssertionError, match=r"identity.*'w' at \(0,\): got 2.0, expected 1.0"):
        testing.check_identity_on_equal(shifted_mean, TREES[0], WEIGHTS)


def test_check_permutation_invariance() -> None:
    testing.check_permutation_invariance(median, TREES, WEIGHTS)
    testing.check_permutation_invariance(
        median, TREES, WEIGHTS, permutations=list(itertools.permutations(range(3)))
    )
    with pytest.raises(AssertionError, match=r"permuted by \[2, 1, 0\]"):
        testing.check_permutation_invariance(first_tree, TREES, WEIGHTS)
    with pytest.raises(AssertionError, match=r"permuted by \[1, 0, 2\]"):
        testing.check_permutation_invariance(first_tree, TREES, WEIGHTS, permutations=[[1, 0, 2]])
    with pytest.raises(ValueError, match="not a permutation"):
        testing.check_permutation_invariance(median, TREES, WEIGHTS, permutations=[[0, 0, 1]])


def test_check_coordinate_bounds() -> None:
    testing.check_coordinate_bounds(mean, TREES, WEIGHTS)
    testing.check_coordinate_bounds(median, TREES, [0.0, 1.0, 1.0])
    with pytest.raises(AssertionError, match=r"'w' at \(0,\).*outside \[-1.0, 4.0\]"):
        testing.check_coordinate_bounds(unnormalised_sum, TREES, WEIGHTS)
    # The range is the positive-weight clients' only: including a zero-weight one breaks it.
    with pytest.raises(AssertionError, match="outside"):
        testing.check_coordinate_bounds(mean_of_all, TREES, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="positive weight"):
        testing.check_coordinate_bounds(mean, TREES, [0.0, 0.0, 0.0])


def test_check_honest_bounds() -> None:
    attacked = [*TREES, {"w": torch.tensor([1e30, -1e30]), "n": torch.tensor(10**6)}]
    testing.check_honest_bounds(median, attacked, [1] * 4, honest=[0, 1, 2])
    with pytest.raises(AssertionError, match=r"clients \[0, 1, 2\]"):
        testing.check_honest_bounds(mean, attacked, [1] * 4, honest=[0, 1, 2])
    with pytest.raises(ValueError, match="honest"):
        testing.check_honest_bounds(mean, attacked, [1] * 4, honest=[])
    with pytest.raises(ValueError, match="honest"):
        testing.check_honest_bounds(mean, attacked, [1] * 4, honest=[4])


def test_check_weight_scaling() -> None:
    testing.check_weight_scaling(mean, TREES, [1.0, 2.0, 4.0], factor=0.5)
    with pytest.raises(AssertionError, match=r"weights scaled by 3\.0"):
        testing.check_weight_scaling(unnormalised_sum, TREES, WEIGHTS)
    with pytest.raises(ValueError, match="factor"):
        testing.check_weight_scaling(mean, TREES, WEIGHTS, factor=0.0)


def test_check_zero_weight_client() -> None:
    testing.check_zero_weight_client(mean, TREES, WEIGHTS)
    testing.check_zero_weight_client(median, TREES, WEIGHTS, extra=TREES[0])
    with pytest.raises(AssertionError, match="zero-weight client added first"):
        testing.check_zero_weight_client(mean_of_all, TREES, WEIGHTS)


def test_check_weight_two_equals_two_copies() -> None:
    testing.check_weight_two_equals_two_copies(mean, TREES, [1.0, 3.0, 0.5])
    two = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}]
    with pytest.raises(AssertionError, match="client 0 doubled"):
        testing.check_weight_two_equals_two_copies(median, two, [1.0, 1.0])
    with pytest.raises(ValueError, match="index"):
        testing.check_weight_two_equals_two_copies(mean, TREES, WEIGHTS, index=3)


def test_check_affine_equivariance() -> None:
    testing.check_affine_equivariance(mean, TREES, [1.0, 1.0, 2.0], a=2.0, b=0.0)
    testing.check_affine_equivariance(median, TREES, WEIGHTS, a=-3.0, b=0.25)
    with pytest.raises(AssertionError, match=r"affine map a=2\.0, b=0\.0"):
        testing.check_affine_equivariance(shifted_mean, TREES, WEIGHTS, a=2.0, b=0.0)
    with pytest.raises(ValueError, match="finite"):
        testing.check_affine_equivariance(mean, TREES, WEIGHTS, a=math.inf, b=0.0)


def test_check_selects_an_input() -> None:
    testing.check_selects_an_input(krum(0), TREES, WEIGHTS)
    testing.check_selects_an_input(first_tree, TREES, WEIGHTS)
    with pytest.raises(AssertionError, match="not bitwise equal"):
        testing.check_selects_an_input(mean, TREES, WEIGHTS)
    # A zero-weight client does not count as an input.
    with pytest.raises(AssertionError, match="not bitwise equal"):
        testing.check_selects_an_input(first_tree, TREES, [0.0, 1.0, 1.0])


def test_check_rejects_all_zero_weights() -> None:
    testing.check_rejects_all_zero_weights(mean, TREES)
    testing.check_rejects_all_zero_weights(krum(0), TREES)
    with pytest.raises(AssertionError, match="were accepted"):
        testing.check_rejects_all_zero_weights(silent_on_zero_weights, TREES)
    with pytest.raises(AssertionError, match="raised ZeroDivisionError"):
        testing.check_rejects_all_zero_weights(wrong_error_on_zero_weights, TREES)


# --------------------------------------------------------------------------------------------
# Tolerances


def _constant(value: torch.Tensor) -> Aggregator:
    def agg(trees: Sequence[Params], weights: Sequence[float]) -> Result:
        return {"w": value.clone()}

    return agg


def test_exact_comparison_identifies_signed_zeros_only() -> None:
    testing.check_identity_on_equal(
        _constant(torch.tensor([-0.0])), {"w": torch.tensor([0.0])}, [1]
    )
    with pytest.raises(AssertionError, match="exact"):
        testing.check_identity_on_equal(
            _constant(torch.tensor([math.nan])), {"w": torch.tensor([math.nan])}, [1]
        )


def test_ulps_are_relative_to_the_largest_input() -> None:
    one = torch.tensor([1.0])
    next_up = torch.nextafter(one, torch.tensor([2.0]))
    target = {"w": one}
    with pytest.raises(AssertionError, match="exact"):
        testing.check_identity_on_equal(_constant(next_up), target, [1])
    testing.check_identity_on_equal(_constant(next_up), target, [1], ulps=1)
    with pytest.raises(AssertionError, match="ulps=1"):
        testing.check_identity_on_equal(_constant(one + 3e-7), target, [1], ulps=1)
    # Near zero, the inputs' magnitude sets the scale: 1e-8 is within 1 ulp of inputs of size 1.
    trees = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([-1.0])}]
    testing.check_permutation_invariance(
        lambda t, w: {"w": torch.tensor([1e-8 if t[0]["w"].item() > 0 else 0.0])},
        trees,
        [1, 1],
        ulps=1,
    )
    testing.check_identity_on_equal(_constant(one + 1e-3), target, [1], atol=2e-3)


def test_integer_tolerance_counts_units() -> None:
    target = {"w": torch.tensor([10])}
    testing.check_identity_on_equal(_constant(torch.tensor([11])), target, [1], ulps=1)
    with pytest.raises(AssertionError):
        testing.check_identity_on_equal(_constant(torch.tensor([12])), target, [1], ulps=1)


# --------------------------------------------------------------------------------------------
# Strategies


@settings(max_examples=30)
@given(
    batch=testing.client_batches(
        min_clients=2, max_clients=4, dtypes=[torch.float16, torch.int64], max_abs=100.0
    )
)
def test_client_batches_share_one_structure(batch: testing.ClientBatch) -> None:
    assert 2 <= len(batch.trees) == len(batch.weights) <= 4
    assert all(w >= 0 and math.isfinite(w) for w in batch.weights)
    assert batch.positive()
    spec = [(n, t.shape, t.dtype) for n, t in batch.trees[0].items()]
    for params in batch.trees:
        assert [(n, t.shape, t.dtype) for n, t in params.items()] == spec
        for t in params.values():
            assert t.dtype in (torch.float16, torch.int64)
            assert bool((t.to(torch.float64).abs() <= 100).all())


@settings(max_examples=20)
@given(batch=testing.client_batches(zero_weights=False, integer_weights=True))
def test_client_batches_weight_options(batch: testing.ClientBatch) -> None:
    assert all(w >= 1 and w == int(w) for w in batch.weights)


@settings(max_examples=30)
@given(data=st.data(), k=st.integers(0, 3))
def test_adversarial_replacements_replace_at_most_k(data: st.DataObject, k: int) -> None:
    batch = data.draw(testing.client_batches(max_clients=5))
    corrupted = data.draw(testing.adversarial_replacements(batch, k))
    assert len(corrupted.replaced) <= min(k, len(batch.trees))
    assert list(corrupted.replaced) == sorted(set(corrupted.replaced))
    assert corrupted.batch.weights == batch.weights
    for i, (old, new) in enumerate(zip(batch.trees, corrupted.batch.trees, strict=True)):
        if i not in corrupted.replaced:
            assert new is old
        assert [(n, t.shape, t.dtype) for n, t in new.items()] == [
            (n, t.shape, t.dtype) for n, t in old.items()
        ]
        assert all(bool(torch.isfinite(t).all()) for t in new.values())
    assert set(corrupted.honest()) == set(batch.positive()) - set(corrupted.replaced)


def test_adversarial_replacements_reach_huge_values() -> None:
    batch = testing.ClientBatch(trees=({"w": torch.zeros(3)},) * 2, weights=(1.0, 1.0))
    seen: list[float] = []

    @settings(max_examples=50, database=None)
    @given(testing.adversarial_replacements(batch, 2))
    def collect(corrupted: testing.Corrupted) -> None:
        for i in corrupted.replaced:
            seen.append(float(corrupted.batch.trees[i]["w"].abs().max()))

    collect()
    assert max(seen) >= 1e38


@settings(max_examples=20)
@given(structure=testing.tree_structures(max_entries=2, max_ndim=1, max_side=2))
def test_tree_structures_respect_limits(structure: testing.TreeStructure) -> None:
    assert 1 <= len(structure.entries) <= 2
    assert len({name for name, _, _ in structure.entries}) == len(structure.entries)
    for _, shape, dtype in structure.entries:
        assert len(shape) <= 1
        assert all(0 <= side <= 2 for side in shape)
        assert dtype in testing.FLOAT_DTYPES


@settings(max_examples=20)
@given(params=testing.params_trees(dtypes=[torch.bfloat16, torch.float64], max_abs=None))
def test_params_trees_are_finite_over_the_whole_range(params: dict[str, torch.Tensor]) -> None:
    assert all(bool(torch.isfinite(t).all()) for t in params.values())


def test_strategy_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="min_clients"):
        testing.client_batches(min_clients=0)
    with pytest.raises(ValueError, match="min_clients"):
        testing.client_batches(min_clients=3, max_clients=2)
    with pytest.raises(ValueError, match="dtypes"):
        testing.tree_structures(dtypes=[])
    with pytest.raises(ValueError, match="max_entries"):
        testing.tree_structures(max_entries=0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        testing.adversarial_replacements(testing.ClientBatch(trees=(), weights=()), -1)
