"""Random streams as wide as the keys: every torch draw depends on all 128 bits of its key.

Golden vectors pin stream version 2; properties flip every bit of random keys; the CPU state's
layout is checked against an independent mt19937 (numpy's), so a torch that changes its private
layout fails here, loudly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from _rng import global_rng_untouched
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn import keys as streams
from blazefl_fn.client.stochastic import KeyedDropout, keyed_rng
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.keys import STREAMS_VERSION, Key
from blazefl_fn.models import build_module

keys = st.binary(min_size=16, max_size=16).map(Key)
positions = st.integers(min_value=0, max_value=127)

_BASE = TensorDataset(torch.arange(64.0).unsqueeze(1), torch.arange(64))
_CLIENT = ClientData(_BASE, torch.arange(64))


def flipped(key: Key, bit: int) -> Key:
    """``key`` with bit ``bit`` (0 = the lowest bit of the first byte) inverted."""
    value = int.from_bytes(key.bits, "little") ^ (1 << bit)
    return Key(value.to_bytes(16, "little"))


def draws(make: Callable[[Key], torch.Generator], key: Key) -> list[torch.Tensor]:
    """What a client draws from its key: a batch order, uniforms, a dropout mask, batches."""
    out = [
        torch.randperm(64, generator=make(key)),
        torch.rand(16, generator=make(key)),
        torch.cat([y for _, y in _CLIENT.batches(8, make(key))]),
    ]
    layer = KeyedDropout(0.5)
    with keyed_rng(key):
        out.append(layer(torch.ones(64)) != 0)
    return out


def _differ_everywhere(make: Callable[[Key], torch.Generator], key: Key, bit: int) -> bool:
    ours, theirs = draws(make, key), draws(make, flipped(key, bit))
    # The dropout mask comes from `keyed_rng`, i.e. from `Key.torch_generator`, whatever `make`.
    return all(not torch.equal(a, b) for a, b in zip(ours[:3], theirs[:3], strict=True))


def test_the_stream_version_is_two() -> None:
    assert STREAMS_VERSION == 2


# -- golden vectors: stream version 2 ------------------------------------------------------------


def test_golden_cpu_stream() -> None:
    root = Key.from_seed(0)
    assert torch.rand(3, generator=root.torch_generator()).tolist() == pytest.approx(
        [0.012497663497924805, 0.4682655334472656, 0.05128508806228638], abs=0
    )
    assert torch.randperm(10, generator=root.torch_generator()).tolist() == [
        4, 5, 7, 8, 0, 2, 3, 9, 1, 6,
    ]  # fmt: skip
    assert root.torch_generator().initial_seed() == int.from_bytes(root.bits[:8], "little")


def test_golden_batch_order() -> None:
    batches = _CLIENT.batches(8, Key.from_seed(0).fold_in(3).torch_generator())
    assert [y.tolist() for _, y in batches][:2] == [
        [17, 53, 14, 29, 33, 18, 57, 50],
        [5, 32, 6, 59, 60, 46, 38, 63],
    ]


def test_golden_philox_seed_and_offset() -> None:
    assert streams.philox_seed_offset(Key.from_seed(0).bits) == (
        7490145856470734439,
        3025164149343791048,
    )


def test_the_cpu_state_is_the_documented_shake_expansion() -> None:
    key = Key.from_seed(7)
    state = streams.cpu_state(key.bits).numpy().tobytes()
    words = hashlib.shake_128(b"blazefl_fn.streams.v2:mt19937" + key.bits).digest(4 * 624)
    assert np.array_equal(
        np.frombuffer(state[24 : 24 + 8 * 624], dtype="<u8"),
        np.frombuffer(words, dtype="<u4").astype("<u8"),
    )


# -- the private layout, checked against an independent mt19937 ---------------------------------


def test_draws_follow_numpys_mt19937_from_the_same_624_words() -> None:
    # If torch moved the words (or reordered the position fields), the draws would differ.
    key = Key.from_seed(11)
    words = hashlib.shake_128(b"blazefl_fn.streams.v2:mt19937" + key.bits).digest(4 * 624)
    reference = np.random.MT19937()
    reference.state = {
        "bit_generator": "MT19937",
        "state": {"key": np.frombuffer(words, dtype="<u4"), "pos": 624},
    }
    raw = reference.random_raw(2 * 1000)
    drawn = torch.empty(1000, dtype=torch.int64).random_(0, 2**32, generator=key.torch_generator())
    # Each 64-bit draw is two mt19937 outputs, high word first; modulo 2**32 keeps the second.
    assert drawn.tolist() == raw[1::2].tolist()


def test_the_layout_check_accepts_this_torch_and_refuses_a_moved_layout() -> None:
    probe = torch.Generator()
    probe.manual_seed(streams.PROBE_SEED)
    raw = probe.get_state().numpy().tobytes()
    between, after = streams.layout_of(raw)
    assert len(between) == 16
    assert len(raw) == 8 + 16 + 8 * 624 + len(after)
    moved = [
        raw[:24] + bytes(8) + raw[24:],  # a field inserted before the words
        raw[:12] + bytes(4) + raw[16:],  # "seeded" cleared
        raw[: 8 + 16 + 8 * 600],  # truncated
        (1).to_bytes(8, "little") + raw[8:],  # another seed field
    ]
    for bad in moved:
        with pytest.raises(RuntimeError, match="lays out its CPU generator state differently"):
            streams.layout_of(bad)


# -- properties: every bit of the key reaches every draw -----------------------------------------


@settings(max_examples=60, deadline=None)
@given(keys, positions)
def test_flipping_any_bit_changes_every_draw(key: Key, bit: int) -> None:
    ours, theirs = draws(Key.torch_generator, key), draws(Key.torch_generator, flipped(key, bit))
    for a, b in zip(ours, theirs, strict=True):
        assert not torch.equal(a, b), bit


@settings(max_examples=20, deadline=None)
@given(keys)
def test_equal_keys_give_equal_draws(key: Key) -> None:
    twin = Key(bytes(key.bits))
    for a, b in zip(draws(Key.torch_generator, key), draws(Key.torch_generator, twin), strict=True):
        assert torch.equal(a, b)


def test_every_one_of_the_128_bits_of_one_key_reaches_the_stream() -> None:
    key = Key.from_seed(2026)
    missed = [bit for bit in range(128) if not _differ_everywhere(Key.torch_generator, key, bit)]
    assert missed == []


def test_the_property_catches_a_seed_truncated_to_64_bits() -> None:
    # Stream version 1 seeded with the first 64 bits, of which mt19937 kept 32: the same check
    # finds 96 bits that never reach the draws.
    def truncated(key: Key) -> torch.Generator:
        return torch.Generator().manual_seed(int.from_bytes(key.bits[:8], "little"))

    key = Key.from_seed(2026)
    missed = [bit for bit in range(128) if not _differ_everywhere(truncated, key, bit)]
    assert missed == list(range(32, 128))


@settings(max_examples=30, deadline=None)
@given(keys, positions)
def test_the_philox_seed_and_offset_both_depend_on_every_bit(key: Key, bit: int) -> None:
    seed, offset = streams.philox_seed_offset(key.bits)
    other_seed, other_offset = streams.philox_seed_offset(flipped(key, bit).bits)
    assert seed != other_seed
    assert offset != other_offset
    assert offset % 4 == 0
    assert 0 <= offset < 2**62


@settings(max_examples=20, deadline=None)
@given(keys, positions)
def test_model_initialisation_depends_on_every_bit(key: Key, bit: int) -> None:
    def factory() -> torch.nn.Module:
        return torch.nn.Linear(8, 8)

    with global_rng_untouched():
        a = build_module(factory, key).weight
        b = build_module(factory, flipped(key, bit)).weight
        again = build_module(factory, key).weight
    assert not torch.equal(a, b)
    assert torch.equal(a, again)


def test_generators_leave_the_global_rng_alone() -> None:
    with global_rng_untouched():
        torch.randperm(100, generator=Key.from_seed(1).torch_generator())


def test_a_factory_that_initialises_cuda_is_built_again_keyed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Simulated on the CPU (tests/test_cuda.py checks the real thing): CUDA comes up inside the
    # factory's first call, so its draws came from a generator no key had set.
    initialised = iter([False, True, True, True])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: next(initialised))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    calls: list[int] = []

    def factory() -> torch.nn.Module:
        calls.append(1)
        return torch.nn.Linear(3, 3)

    built = build_module(factory, Key.from_seed(4))
    assert len(calls) == 2
    monkeypatch.undo()
    assert torch.equal(built.weight, build_module(factory, Key.from_seed(4)).weight)
