"""SCARLET's soft-label cache: the age rule, the per-index signals, and immutable updates.

The rule: an entry produced in round ``p`` is fresh in round ``now`` iff
``p >= 0 and now - p < D``. Expectations are written out here with Python ints.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.algorithms.label_cache import CacheSignal, SoftLabelCache, is_fresh

FEW = settings(max_examples=80)


def _fresh(p: int, now: int, duration: int) -> bool:
    return 0 <= p <= now and now - p < duration


def _signal(p: int, now: int, duration: int) -> CacheSignal:
    if p < 0:
        return CacheSignal.NEW
    return CacheSignal.CACHED if now - p < duration else CacheSignal.EXPIRED


@st.composite
def caches(draw: st.DrawFn) -> tuple[SoftLabelCache, int]:
    """A cache of 1..30 entries produced in rounds -1..now, and ``now``."""
    now = draw(st.integers(0, 40))
    size = draw(st.integers(1, 30))
    produced = draw(st.lists(st.integers(-1, now), min_size=size, max_size=size))
    classes = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    labels = torch.rand(size, classes, generator=g)
    return SoftLabelCache(labels, torch.tensor(produced, dtype=torch.int64)), now


def _indices(draw: st.DrawFn, size: int) -> torch.Tensor:
    picked = draw(st.lists(st.integers(0, size - 1), max_size=size, unique=True))
    return torch.tensor(picked, dtype=torch.int64)


# -- the age rule ----------------------------------------------------------------------------


@FEW
@given(st.integers(-1, 60), st.integers(0, 60), st.integers(0, 20))
def test_is_fresh_follows_the_age_rule(p: int, now: int, duration: int) -> None:
    got = is_fresh(torch.tensor([p]), now, duration)
    assert got.dtype == torch.bool
    assert bool(got[0]) is _fresh(p, now, duration)


@FEW
@given(st.integers(1, 20), st.integers(0, 60))
def test_age_duration_minus_one_is_fresh_and_age_duration_is_not(duration: int, p: int) -> None:
    ages = torch.tensor([p, p, p, p])
    now = torch.tensor([p, p + duration - 1, p + duration, p + duration + 1])
    assert [bool(is_fresh(ages[i : i + 1], int(now[i]), duration)[0]) for i in range(4)] == [
        True,
        True,
        False,
        False,
    ]


@FEW
@given(st.integers(0, 60), st.data())
def test_nothing_is_fresh_with_duration_zero_or_when_empty(now: int, data: st.DataObject) -> None:
    produced = data.draw(st.lists(st.integers(0, now), min_size=1, max_size=10))
    assert not bool(is_fresh(torch.tensor(produced), now, 0).any())
    duration = data.draw(st.integers(0, 100))
    assert not bool(is_fresh(torch.tensor([-1, -1]), now, duration).any())


def test_is_fresh_is_elementwise_on_a_vector() -> None:
    produced = list(range(-1, 11))
    got = is_fresh(torch.tensor(produced), now=10, duration=3).tolist()
    assert got == [_fresh(p, 10, 3) for p in produced]
    assert [p for p, f in zip(produced, got, strict=True) if f] == [8, 9, 10]


# -- signals ---------------------------------------------------------------------------------


def test_signal_values_are_the_wire_format() -> None:
    assert [int(s) for s in (CacheSignal.CACHED, CacheSignal.NEW, CacheSignal.EXPIRED)] == [
        0,
        1,
        2,
    ]


@pytest.mark.parametrize("duration", [1, 2, 5])
def test_signals_at_the_boundary_ages(duration: int) -> None:
    now = 10
    # Ages duration - 1 and duration, a brand-new entry (age 0), an old one and an empty one.
    produced = torch.tensor([now - duration + 1, now - duration, now, 0, -1])
    cache = SoftLabelCache(torch.zeros(5, 2), produced)
    signals = cache.signals(torch.arange(5), now, duration)
    assert signals.dtype == torch.uint8
    assert signals.tolist() == [
        CacheSignal.CACHED,
        CacheSignal.EXPIRED,
        CacheSignal.CACHED,
        CacheSignal.EXPIRED,
        CacheSignal.NEW,
    ]
    assert cache.fresh(torch.arange(5), now, duration).tolist() == [True, False, True, False, False]


def test_with_duration_zero_every_label_is_new_or_expired() -> None:
    cache = SoftLabelCache(torch.zeros(3, 2), torch.tensor([-1, 4, 5]))
    assert cache.signals(torch.tensor([0, 1, 2]), 5, 0).tolist() == [
        CacheSignal.NEW,
        CacheSignal.EXPIRED,
        CacheSignal.EXPIRED,
    ]


@FEW
@given(caches(), st.integers(0, 12), st.data())
def test_signals_are_cached_exactly_where_fresh(
    cache_now: tuple[SoftLabelCache, int], duration: int, data: st.DataObject
) -> None:
    cache, now = cache_now
    picked = data.draw(st.lists(st.integers(0, len(cache.produced) - 1), max_size=40))
    index = torch.tensor(picked, dtype=torch.int64)  # repeats allowed
    produced = [int(cache.produced[i]) for i in picked]
    signals = cache.signals(index, now, duration)
    assert signals.dtype == torch.uint8
    assert signals.shape == (len(picked),)
    assert signals.tolist() == [_signal(p, now, duration) for p in produced]
    fresh = cache.fresh(index, now, duration).tolist()
    assert fresh == [_fresh(p, now, duration) for p in produced]
    assert fresh == [s == CacheSignal.CACHED for s in signals.tolist()]


# -- put, apply, stale -----------------------------------------------------------------------


def test_an_empty_cache_has_no_labels() -> None:
    cache = SoftLabelCache.empty(4, 3)
    assert torch.equal(cache.labels, torch.zeros(4, 3))
    assert cache.labels.dtype == torch.float32
    assert torch.equal(cache.produced, torch.full((4,), -1))
    assert cache.produced.dtype == torch.int64
    assert cache.signals(torch.arange(4), 0, 3).tolist() == [CacheSignal.NEW] * 4


@FEW
@given(caches(), st.data())
def test_put_returns_a_new_cache_and_leaves_the_original_alone(
    cache_now: tuple[SoftLabelCache, int], data: st.DataObject
) -> None:
    cache, now = cache_now
    size, classes = cache.labels.shape
    index = _indices(data.draw, size)
    labels = torch.rand(len(index), classes, dtype=torch.float64)
    old_labels, old_produced = cache.labels.clone(), cache.produced.clone()
    given_labels = labels.clone()

    new = cache.put(index, labels, now + 1)

    assert new is not cache
    assert new.labels.data_ptr() != cache.labels.data_ptr()
    assert new.produced.data_ptr() != cache.produced.data_ptr()
    assert torch.equal(cache.labels, old_labels)
    assert torch.equal(cache.produced, old_produced)
    assert torch.equal(labels, given_labels)
    assert new.labels.dtype == torch.float32
    chosen = set(index.tolist())
    for i in range(size):
        if i in chosen:
            row = index.tolist().index(i)
            assert torch.equal(new.labels[i], labels[row].float())
            assert int(new.produced[i]) == now + 1
        else:
            assert torch.equal(new.labels[i], old_labels[i])
            assert int(new.produced[i]) == int(old_produced[i])
    # The new cache does not share memory with the labels it was given either.
    labels.add_(1.0)
    if len(index):
        assert torch.equal(new.labels[index], given_labels.float())


@FEW
@given(caches(), st.data())
def test_apply_writes_entries_with_their_own_rounds(
    cache_now: tuple[SoftLabelCache, int], data: st.DataObject
) -> None:
    cache, now = cache_now
    size, classes = cache.labels.shape
    index = _indices(data.draw, size)
    rounds = data.draw(st.lists(st.integers(-1, now), min_size=len(index), max_size=len(index)))
    produced = torch.tensor(rounds, dtype=torch.int64)
    labels = torch.rand(len(index), classes)
    old_labels, old_produced = cache.labels.clone(), cache.produced.clone()

    new = cache.apply(index, labels, produced)

    assert torch.equal(cache.labels, old_labels)
    assert torch.equal(cache.produced, old_produced)
    expected_produced = old_produced.tolist()
    for i, r in zip(index.tolist(), rounds, strict=True):
        expected_produced[i] = r
    assert new.produced.tolist() == expected_produced
    assert torch.equal(new.labels[index], labels)


@FEW
@given(caches(), st.data())
def test_stale_is_exactly_where_the_holder_differs(
    cache_now: tuple[SoftLabelCache, int], data: st.DataObject
) -> None:
    cache, now = cache_now
    size = len(cache.produced)
    known_list = data.draw(st.lists(st.integers(-1, now), min_size=size, max_size=size))
    known = torch.tensor(known_list, dtype=torch.int64)
    index = _indices(data.draw, size)
    kept = known.clone()
    got = cache.stale(known, index)
    assert got.dtype == torch.int64
    assert got.tolist() == [i for i in index.tolist() if known_list[i] != int(cache.produced[i])]
    assert torch.equal(known, kept)
    # A holder that has caught up (applied what it was told) is stale nowhere.
    if len(got):
        caught_up = SoftLabelCache(torch.zeros(size, 1), known).apply(
            got, torch.zeros(len(got), 1), cache.produced[got]
        )
        assert cache.stale(caught_up.produced, index).tolist() == []


def test_stale_by_hand() -> None:
    cache = SoftLabelCache(torch.zeros(5, 2), torch.tensor([-1, 3, 4, 4, 0]))
    known = torch.tensor([-1, 2, 4, -1, 0])
    assert cache.stale(known, torch.tensor([4, 3, 2, 1, 0])).tolist() == [3, 1]
    assert cache.stale(known, torch.tensor([0, 2, 4])).tolist() == []


def test_an_entry_from_a_later_round_is_never_fresh() -> None:
    # Only an inconsistent state holds one; with D = 0 the age test alone would pass it.
    assert not bool(is_fresh(torch.tensor([5]), now=3, duration=0).any())
    assert not bool(is_fresh(torch.tensor([5]), now=3, duration=10).any())
