"""Soft-label aggregation: the client mean, ERA, Enhanced ERA and entropy.

Properties run on rows drawn as the softmax of bounded random logits (so every entry is > 0);
golden values are computed here with Python's math module.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.algorithms.soft_labels import enhanced_era, entropy, era, mean_soft_labels

FEW = settings(max_examples=60)


@st.composite
def prob_rows(draw: st.DrawFn, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1..20 rows of 2..12 classes: softmax of logits in [-8, 8], computed in ``dtype``.

    The logits' scale runs down to 0 (uniform rows) and through tiny values (nearly uniform
    rows); rounded logits give rows with tied classes.
    """
    rows = draw(st.integers(1, 20))
    classes = draw(st.integers(2, 12))
    scale = draw(st.sampled_from([0.0, 1e-6, 1e-3]) | st.floats(0.0, 8.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logits = (torch.rand(rows, classes, generator=g, dtype=torch.float64) * 2 - 1) * scale
    if draw(st.booleans()):
        logits = logits.round()
    return torch.softmax(logits.to(dtype), dim=1)


def _entropy_reference(row: list[float]) -> float:
    return -math.fsum(p * math.log(p) for p in row if p > 0)


def _is_uniform(row: torch.Tensor) -> bool:
    return bool((row == row[0]).all())


# -- Enhanced ERA ----------------------------------------------------------------------------


@FEW
@given(prob_rows(), st.sampled_from([1, 1.0]), st.floats(0.01, 100.0))
def test_exponent_one_is_the_formula_a_normalisation(
    probs: torch.Tensor, one: float, scale: float
) -> None:
    # p**1 / sum(p**1): before, exponent 1 returned an unnormalised row unchanged.
    scaled = probs * scale
    kept = scaled.clone()
    out = enhanced_era(scaled, one)
    wide = scaled.to(torch.float64)
    assert torch.equal(out, (wide / wide.sum(dim=1, keepdim=True)).to(scaled.dtype))
    assert out.dtype == scaled.dtype
    assert torch.equal(scaled, kept)  # the input is not written into
    out.add_(1.0)
    assert torch.equal(scaled, kept)  # and the result does not share its memory


def test_exponent_one_scales_an_unnormalised_row_and_keeps_a_normalised_one() -> None:
    assert enhanced_era(torch.tensor([[2.0, 6.0]]), 1.0).tolist() == [[0.25, 0.75]]
    exact = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    assert torch.equal(enhanced_era(exact, 1.0), exact)
    # And the general path agrees with it where the rows are normalised.
    assert torch.allclose(enhanced_era(exact, 1.0 + 1e-12), exact)


@FEW
@given(prob_rows(), st.floats(1.5, 8.0))
def test_an_exponent_above_one_sharpens_every_row(probs: torch.Tensor, exponent: float) -> None:
    kept = probs.clone()
    out = enhanced_era(probs, exponent)
    assert torch.equal(probs, kept)
    assert out.shape == probs.shape
    assert out.dtype == torch.float32
    assert torch.allclose(out.sum(dim=1, dtype=torch.float64), torch.ones(len(out)).double())
    before, after = entropy(probs), entropy(out)
    # Both entropies are float32 sums of float32 terms (errors ~1e-7 for at most 12 classes),
    # so a row whose true entropy barely moves (a nearly uniform one) may read up to that
    # much higher; 1e-6 covers it.
    assert bool((after <= before + 1e-6).all()), (before, after)
    for row, h_before, h_after in zip(probs, before.tolist(), after.tolist(), strict=True):
        spread = float(row.max() - row.min())
        if spread >= 0.01:
            # Far enough from uniform for the drop (>= 1e-5 here) to dwarf the rounding.
            assert h_after < h_before - 1e-6, (row, h_before, h_after)
        elif _is_uniform(row):
            assert h_after == pytest.approx(h_before, abs=1e-6)


@FEW
@given(prob_rows(dtype=torch.float64), st.floats(1.5, 8.0))
def test_in_float64_entropy_strictly_drops_for_every_non_uniform_row(
    probs: torch.Tensor, exponent: float
) -> None:
    # Bounded logits never give a one-hot row, so only uniform rows may keep their entropy.
    out = enhanced_era(probs, exponent)
    assert out.dtype == torch.float64
    for row, h_before, h_after in zip(probs, entropy(probs), entropy(out), strict=True):
        if _is_uniform(row):
            assert float(h_after) == pytest.approx(float(h_before), abs=1e-12)
        elif float(row.max() - row.min()) >= 1e-4:
            # Float64 rounding of entropies near log(12) is ~1e-15; the drop here is far larger.
            assert float(h_after) < float(h_before), row


@FEW
@given(prob_rows(), st.floats(0.05, 0.95))
def test_an_exponent_below_one_flattens_every_row(probs: torch.Tensor, exponent: float) -> None:
    out = enhanced_era(probs, exponent)
    before, after = entropy(probs), entropy(out)
    # The same float32 rounding allowance as for sharpening, in the other direction.
    assert bool((after >= before - 1e-6).all()), (before, after)


@FEW
@given(prob_rows(), st.floats(0.05, 8.0))
def test_the_order_of_the_classes_is_kept(probs: torch.Tensor, exponent: float) -> None:
    out = enhanced_era(probs, exponent)
    rows = torch.arange(len(probs))
    # The most likely class stays a most likely class (exactly: rounding is monotone).
    assert torch.equal(out[rows, probs.argmax(dim=1)], out.max(dim=1).values)
    # And so does every pairwise order, weakly.
    bigger = probs[:, :, None] >= probs[:, None, :]
    assert bool((out[:, :, None] >= out[:, None, :])[bigger].all())


def test_enhanced_era_golden_values() -> None:
    p = [0.6, 0.3, 0.1]
    for exponent in (2.0, 3.0, 0.5):
        powers = [x**exponent for x in p]
        expected = torch.tensor([[x / math.fsum(powers) for x in powers]], dtype=torch.float64)
        got = enhanced_era(torch.tensor([p], dtype=torch.float64), exponent)
        assert torch.allclose(got, expected, rtol=1e-13, atol=0.0)
        got32 = enhanced_era(torch.tensor([p]), exponent)
        assert torch.allclose(got32, expected.float(), rtol=1e-6, atol=0.0)
    # The docstring's example: 0.36 / 0.52 and 0.16 / 0.52.
    got = enhanced_era(torch.tensor([[0.6, 0.4]], dtype=torch.float64), 2.0)
    assert got.tolist()[0] == pytest.approx([0.36 / 0.52, 0.16 / 0.52], rel=1e-14)


def test_enhanced_era_keeps_zeros_one_hot_rows_and_uniform_rows() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    for exponent in (0.3, 2.0, 50.0):
        out = enhanced_era(probs, exponent)
        assert torch.equal(out[0], torch.tensor([0.0, 1.0, 0.0]))
        assert torch.equal(out[1], torch.tensor([0.5, 0.0, 0.5]))
        assert _is_uniform(out[2])
        assert float(out[2].sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(entropy(out[:1])[0]) == 0.0


def test_a_large_exponent_does_not_underflow_to_nan() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    # Done naively in float32, p**200 underflows to 0 for every entry and 0 / 0 is nan.
    assert bool(torch.isnan(probs**200 / (probs**200).sum()).all())
    powers = [x**200 for x in (0.5, 0.3, 0.2)]  # Python floats: no underflow yet
    expected = torch.tensor([[x / math.fsum(powers) for x in powers]], dtype=torch.float64)
    out = enhanced_era(probs, 200.0)
    assert not bool(torch.isnan(out).any())
    assert float(out[0, 0]) == 1.0
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-44)


# -- ERA -------------------------------------------------------------------------------------


def test_era_golden_values() -> None:
    p = [0.6, 0.3, 0.1]
    for temperature in (0.1, 0.5, 1.0, 2.0):
        exps = [math.exp(x / temperature) for x in p]
        expected = torch.tensor([[e / math.fsum(exps) for e in exps]], dtype=torch.float64)
        got = era(torch.tensor([p], dtype=torch.float64), temperature)
        assert torch.allclose(got, expected, rtol=1e-13, atol=0.0)
        got32 = era(torch.tensor([p]), temperature)
        assert got32.dtype == torch.float32
        assert torch.allclose(got32, expected.float(), rtol=1e-6, atol=0.0)
    # The default temperature is 0.1 (the docstring's example).
    e = [math.exp(6.0), math.exp(4.0)]
    assert era(torch.tensor([[0.6, 0.4]], dtype=torch.float64)).tolist()[0] == pytest.approx(
        [e[0] / sum(e), e[1] / sum(e)], rel=1e-14
    )


def test_era_flattens_a_confident_label_where_enhanced_era_does_not() -> None:
    # ERA is a softmax of probabilities, which are at most 1 apart: at T = 0.5 a one-hot row
    # becomes [e^2, 1] / (e^2 + 1), a flatter label.
    one_hot = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    flat = era(one_hot, 0.5)
    e2 = math.exp(2.0)
    assert flat.tolist()[0] == pytest.approx([e2 / (e2 + 1), 1 / (e2 + 1)], rel=1e-14)
    assert float(entropy(flat)[0]) > 0.0
    assert torch.equal(enhanced_era(one_hot, 2.0), one_hot)


@FEW
@given(prob_rows(), st.floats(0.01, 10.0))
def test_era_rows_are_distributions_and_the_input_is_kept(
    probs: torch.Tensor, temperature: float
) -> None:
    kept = probs.clone()
    out = era(probs, temperature)
    assert torch.equal(probs, kept)
    assert out.shape == probs.shape
    assert bool((out >= 0).all())
    assert torch.allclose(out.sum(dim=1), torch.ones(len(out)), atol=1e-5)


# -- entropy ---------------------------------------------------------------------------------


def test_entropy_golden_values() -> None:
    rows = [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.7, 0.2, 0.1]]
    got = entropy(torch.tensor(rows, dtype=torch.float64)).tolist()
    assert got == pytest.approx([_entropy_reference(r) for r in rows], rel=1e-14, abs=0.0)
    assert got[0] == pytest.approx(math.log(2.0), rel=1e-15)
    # A certain row is exactly +0.0, not -0.0.
    assert got[1] == 0.0
    assert math.copysign(1.0, got[1]) == 1.0


@FEW
@given(prob_rows())
def test_entropy_matches_a_python_reference(probs: torch.Tensor) -> None:
    got = entropy(probs)
    assert got.shape == (len(probs),)
    for row, h in zip(probs.tolist(), got.tolist(), strict=True):
        assert h == pytest.approx(_entropy_reference(row), rel=1e-5, abs=1e-6)
        assert -1e-6 <= h <= math.log(len(row)) + 1e-6


# -- mean_soft_labels ------------------------------------------------------------------------


@FEW
@given(st.integers(1, 6), st.integers(1, 8), st.integers(2, 6), st.integers(0, 2**31))
def test_mean_is_the_float64_mean_of_the_clients(
    clients: int, rows: int, classes: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = [torch.softmax(torch.randn(rows, classes, generator=g), dim=1) for _ in range(clients)]
    kept = [p.clone() for p in probs]
    got = mean_soft_labels(probs)
    assert got.dtype == torch.float32
    assert got.shape == (rows, classes)
    # Python floats are float64: summed in client order from 0.0, then divided.
    expected = [
        [sum((float(p[i, j]) for p in probs), 0.0) / clients for j in range(classes)]
        for i in range(rows)
    ]
    assert torch.equal(got, torch.tensor(expected, dtype=torch.float64).float())
    assert all(torch.equal(p, k) for p, k in zip(probs, kept, strict=True))


def test_mean_keeps_float64_and_its_docstring_value() -> None:
    a = torch.tensor([[0.1, 0.9]], dtype=torch.float64)
    b = torch.tensor([[0.2, 0.8]], dtype=torch.float64)
    c = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    got = mean_soft_labels([a, b, c])
    assert got.dtype == torch.float64
    assert got.tolist() == [[(0.1 + 0.2 + 0.4) / 3, (0.9 + 0.8 + 0.6) / 3]]
    doc = mean_soft_labels([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])])
    assert torch.equal(doc, torch.tensor([[0.75, 0.25]]))


def test_mean_of_one_client_is_a_copy() -> None:
    p = torch.tensor([[0.3, 0.7]])
    got = mean_soft_labels([p])
    assert torch.equal(got, p)
    got.add_(1.0)
    assert torch.equal(p, torch.tensor([[0.3, 0.7]]))


def test_mean_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="at least one client"):
        mean_soft_labels([])
    with pytest.raises(ValueError, match=r"differ in shape: \(2, 3\) and \(3, 2\)"):
        mean_soft_labels([torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2)])


# -- argument checks -------------------------------------------------------------------------

BAD_NUMBERS = [0, 0.0, -1.0, -1e-300, math.nan, math.inf, -math.inf, True, False, "2", None]


@pytest.mark.parametrize("bad", BAD_NUMBERS, ids=repr)
def test_temperature_and_exponent_must_be_finite_and_positive(bad: object) -> None:
    probs = torch.tensor([[0.6, 0.4]])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        era(probs, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exponent must be a finite number > 0"):
        enhanced_era(probs, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "probs",
    [
        torch.tensor([0.6, 0.4]),
        torch.tensor([[[0.6, 0.4]]]),
        torch.tensor(1.0),
        torch.tensor([[1, 0]]),
    ],
    ids=["1-d", "3-d", "0-d", "int64"],
)
def test_soft_labels_must_be_a_2d_float_tensor(probs: torch.Tensor) -> None:
    for fn in (era, enhanced_era, entropy):
        with pytest.raises(ValueError, match="soft labels must be a 2-D float tensor"):
            fn(probs)


@pytest.mark.parametrize(
    "probs",
    [torch.tensor([[0.6, 0.4], [1.2, -0.2]]), torch.tensor([[0.5, 0.5], [0.0, 0.0]])],
    ids=["negative entry", "zero row"],
)
def test_enhanced_era_rejects_negative_entries_and_empty_rows(probs: torch.Tensor) -> None:
    for exponent in (1.0, 2.0):
        with pytest.raises(ValueError, match="non-negative with every row summing to > 0"):
            enhanced_era(probs, exponent)
