"""The key tree: golden vectors pin the derivation; properties pin the algebra."""

from __future__ import annotations

import copy
import hashlib
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from _rng import global_rng_untouched
from hypothesis import given
from hypothesis import strategies as st

from blazefl_fn.keys import Key

seeds = st.integers(min_value=0, max_value=(1 << 128) - 1)
keys = seeds.map(Key.from_seed)
fold_data = st.one_of(st.integers(min_value=0, max_value=(1 << 64) - 1), st.text(max_size=20))


def _blake(message: bytes, size: int = 16) -> bytes:
    return hashlib.blake2b(message, digest_size=size, person=b"blazefl_fn.key").digest()


# -- golden vectors: any change here changes every user's results --------------------------------


def test_golden_root_keys() -> None:
    assert Key.from_seed(0).bits.hex() == "f6a1509f1c46e2a9ea2687b9bb0bbc88"
    assert Key.from_seed(42).bits.hex() == "d74c013befd85857b686e4a1cf54b40b"


def test_golden_children() -> None:
    root = Key.from_seed(0)
    assert [c.bits.hex() for c in root.split(2)] == [
        "fd04898bfc808956e9b2196a29e8b409",
        "683ba1a221e41752f365494a19bfaaad",
    ]
    assert root.fold_in(7).bits.hex() == "33daf3340497be1a52053c1ad79a3e6c"
    assert root.fold_in("sample").bits.hex() == "7cabf7ff812469664896eb445bb4be18"


def test_golden_structural_draws() -> None:
    root = Key.from_seed(0)
    stream = root.words()
    assert [next(stream) for _ in range(3)] == [
        8369855694656379553,
        4738201599441591483,
        15503768148205911038,
    ]
    assert root.permutation(10) == [7, 1, 2, 0, 5, 4, 9, 8, 6, 3]
    assert root.choice(100, 5) == (53, 16, 40, 99, 8)


def test_golden_generators() -> None:
    root = Key.from_seed(0)
    assert torch.rand(3, generator=root.torch_generator()).tolist() == pytest.approx(
        [0.012497663497924805, 0.4682655334472656, 0.05128508806228638], abs=0
    )
    assert root.numpy_generator().integers(0, 1000, 3).tolist() == [202, 928, 266]


def test_derivation_matches_the_documented_hash() -> None:
    root = Key.from_seed(5)
    assert root.bits == _blake(b"seed" + (5).to_bytes(16, "little"))
    assert root.split(3)[2].bits == _blake(b"split" + root.bits + (2).to_bytes(8, "little"))
    assert root.fold_in(9).bits == _blake(b"fold:int" + root.bits + (9).to_bytes(8, "little"))
    assert root.fold_in("é").bits == _blake(b"fold:str" + root.bits + "é".encode())
    block = _blake(b"stream" + root.bits + (0).to_bytes(8, "little"), 64)
    assert next(root.words()) == int.from_bytes(block[:8], "little")


# -- properties ------------------------------------------------------------------------------


@given(keys, st.integers(min_value=0, max_value=64))
def test_split_children_are_distinct_and_prefix_stable(key: Key, n: int) -> None:
    children = key.split(n)
    assert len(children) == n
    assert len(set(children)) == n
    assert key not in children
    assert children == key.split(n + 3)[:n]


@given(keys, st.integers(min_value=0, max_value=1000), fold_data)
def test_split_and_fold_in_never_collide(key: Key, index: int, data: int | str) -> None:
    assert key.split(index + 1)[index] != key.fold_in(data)


@given(keys, st.integers(min_value=0, max_value=1 << 40))
def test_int_and_str_folds_differ(key: Key, value: int) -> None:
    assert key.fold_in(value) != key.fold_in(str(value))


@given(keys, fold_data, fold_data)
def test_fold_in_is_injective_on_distinct_data(key: Key, a: int | str, b: int | str) -> None:
    if a != b or type(a) is not type(b):
        assert key.fold_in(a) != key.fold_in(b)
    else:
        assert key.fold_in(a) == key.fold_in(b)


@given(seeds, seeds)
def test_distinct_seeds_give_distinct_keys(a: int, b: int) -> None:
    assert (Key.from_seed(a) == Key.from_seed(b)) == (a == b)


@given(keys)
def test_keys_pickle_copy_and_hash(key: Key) -> None:
    restored = pickle.loads(pickle.dumps(key))
    assert restored == key
    assert hash(restored) == hash(key)
    assert copy.deepcopy(key) == key
    assert {key: 1}[restored] == 1
    assert repr(key) == f"Key(0x{key.bits.hex()})"


@given(keys)
def test_keys_are_frozen(key: Key) -> None:
    with pytest.raises(AttributeError):
        key.bits = b"0" * 16  # type: ignore[misc]


@given(keys, st.integers(min_value=0, max_value=300))
def test_permutation_is_a_permutation(key: Key, n: int) -> None:
    perm = key.permutation(n)
    assert sorted(perm) == list(range(n))
    assert perm == key.permutation(n)


@given(keys, st.integers(min_value=0, max_value=10**9), st.data())
def test_choice_is_distinct_and_in_range(key: Key, n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(min_value=0, max_value=min(n, 200)))
    picked = key.choice(n, k)
    assert len(picked) == k
    assert len(set(picked)) == k
    assert all(0 <= i < n for i in picked)


@given(keys, st.integers(min_value=1, max_value=50))
def test_choice_of_all_is_a_permutation(key: Key, n: int) -> None:
    assert sorted(key.choice(n, n)) == list(range(n))


def test_choice_is_close_to_uniform() -> None:
    # 10000 draws of 2 from 10: each item is expected 2000 times, sigma ~42; allow 5 sigma.
    counts: Counter[int] = Counter()
    for i in range(10_000):
        counts.update(Key.from_seed(i).choice(10, 2))
    assert all(abs(counts[i] - 2000) < 212 for i in range(10)), counts


def test_randbelow_is_in_range_and_covers() -> None:
    values = {Key.from_seed(i).randbelow(7) for i in range(200)}
    assert values == set(range(7))


def test_generators_are_fresh_and_reproducible() -> None:
    key = Key.from_seed(3)
    a = torch.randn(5, generator=key.torch_generator())
    b = torch.randn(5, generator=key.torch_generator())
    assert torch.equal(a, b)
    assert np.array_equal(key.numpy_generator().random(4), key.numpy_generator().random(4))
    assert not torch.equal(a, torch.randn(5, generator=key.fold_in(0).torch_generator()))


def test_generators_leave_global_rng_alone() -> None:
    with global_rng_untouched():
        key = Key.from_seed(1)
        torch.rand(10, generator=key.torch_generator())
        key.numpy_generator().random(10)
        key.permutation(100)
        key.choice(100, 10)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: Key.from_seed(-1), ValueError, r"seed must be in \[0"),
        (lambda: Key.from_seed(1 << 128), ValueError, "seed must be in"),
        (lambda: Key.from_seed(True), TypeError, "seed must be an int, got bool"),
        (lambda: Key.from_seed(1.5), TypeError, "got float"),  # type: ignore[arg-type]
        (lambda: Key.from_seed(0).fold_in(-3), ValueError, "fold_in data must be in"),
        (lambda: Key.from_seed(0).fold_in(1 << 64), ValueError, "fold_in data"),
        (lambda: Key.from_seed(0).fold_in(b"x"), TypeError, "got bytes"),  # type: ignore[arg-type]
        (lambda: Key.from_seed(0).split(-1), ValueError, "n must be in"),
        (lambda: Key.from_seed(0).choice(3, 4), ValueError, "k=4 distinct items from n=3"),
        (lambda: Key.from_seed(0).randbelow(0), ValueError, "n must be in"),
        (lambda: Key(b"short"), ValueError, "16 bytes"),
    ],
)
def test_bad_input_is_refused(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]
