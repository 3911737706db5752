"""Tests for the generator-driven batch transforms."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Transform,
    chain,
    cifar_test_transform,
    cifar_train_transform,
    normalize,
    random_crop,
    random_horizontal_flip,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 16, c: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(12345))


TRANSFORMS: dict[str, Transform] = {
    "crop": RandomCrop(32, 4),
    "flip": RandomHorizontalFlip(0.5),
    "train": cifar_train_transform(),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_same_seed_same_output_different_seed_different(name: str) -> None:
    t = TRANSFORMS[name]
    x = batch()
    a = t(x, gen(1))
    assert torch.equal(a, t(x, gen(1)))
    assert not torch.equal(a, t(x, gen(2)))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_input_not_mutated_and_global_rng_untouched(name: str) -> None:
    x = batch()
    before = x.clone()
    state = torch.random.get_rng_state()
    out = TRANSFORMS[name](x, gen(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()


def test_crop_shape_and_identity() -> None:
    x = batch(n=5, h=8, w=10)
    assert random_crop(x, 6, 2, gen(0)).shape == (5, 3, 6, 6)
    out = random_crop(x, 8, 0, gen(0))  # full-height window, random column offset
    assert out.shape == (5, 3, 8, 8)
    square = batch(n=5, h=9, w=9)
    assert torch.equal(random_crop(square, 9, 0, gen(0)), square)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(1, 9),
    padding=st.integers(0, 4),
)
def test_crop_is_a_window_of_the_padded_image(seed: int, size: int, padding: int) -> None:
    x = torch.arange(1, 4 * 2 * 7 * 7 + 1, dtype=torch.float32).reshape(4, 2, 7, 7)
    if size > 7 + 2 * padding:
        with pytest.raises(ValueError, match="exceeds"):
            random_crop(x, size, padding, gen(seed))
        return
    out = random_crop(x, size, padding, gen(seed))
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    for i in range(4):
        found = [
            (r, c)
            for r in range(7 + 2 * padding - size + 1)
            for c in range(7 + 2 * padding - size + 1)
            if torch.equal(padded[i, :, r : r + size, c : c + size], out[i])
        ]
        assert found, f"example {i} is not a window of its padded image"


def test_crop_offsets_vary_per_example() -> None:
    x = torch.arange(32, dtype=torch.float32).reshape(1, 1, 1, 32).expand(64, 1, 1, 32)
    out = random_crop(x.contiguous(), 1, 0, gen(0))
    assert len(set(out.flatten().tolist())) > 10


def test_flip_extremes() -> None:
    x = batch()
    assert torch.equal(random_horizontal_flip(x, gen(0), p=0.0), x)
    assert torch.equal(random_horizontal_flip(x, gen(0), p=1.0), torch.flip(x, dims=[3]))
    out = random_horizontal_flip(x, gen(0), p=0.5)
    flipped = [bool(torch.equal(out[i], x[i].flip(-1))) for i in range(len(x))]
    kept = [bool(torch.equal(out[i], x[i])) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped)
    assert any(kept)


def test_normalize() -> None:
    x = batch(n=2, c=2, h=3, w=3)
    out = normalize(x, (0.5, 0.25), (2.0, 4.0))
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.5) / 2.0)
    assert torch.allclose(out[:, 1], (x[:, 1] - 0.25) / 4.0)
    assert torch.equal(
        cifar_test_transform()(batch(), gen(0)), normalize(batch(), CIFAR10_MEAN, CIFAR10_STD)
    )


def test_train_transform_is_crop_flip_normalize() -> None:
    x = batch()
    g = gen(7)
    expected = normalize(
        random_horizontal_flip(random_crop(x, 32, 4, g), g, 0.5), CIFAR10_MEAN, CIFAR10_STD
    )
    assert torch.equal(cifar_train_transform()(x, gen(7)), expected)


def test_pickle_round_trip() -> None:
    t = cifar_train_transform()
    restored = pickle.loads(pickle.dumps(t))
    assert restored == t
    x = batch()
    assert torch.equal(restored(x, gen(5)), t(x, gen(5)))


def test_threads_are_independent() -> None:
    t = cifar_train_transform()
    x = batch()
    expected = {seed: t(x, gen(seed)) for seed in range(4)}
    results: dict[int, torch.Tensor] = {}

    def work(seed: int) -> None:
        results[seed] = t(x, gen(seed))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(results[s], expected[s]) for s in range(4))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: random_crop(batch(), 41, 4, gen(0)), "crop size 41 exceeds"),
        (lambda: random_crop(batch(), 0, 4, gen(0)), "crop size must be >= 1, got 0"),
        (lambda: random_crop(batch(), 32, -1, gen(0)), "padding must be >= 0, got -1"),
        (lambda: random_crop(torch.zeros(3, 32, 32), 32, 0, gen(0)), "4-D"),
        (lambda: random_horizontal_flip(batch(), gen(0), p=1.5), "got 1.5"),
        (lambda: random_horizontal_flip(batch(), gen(0), p=-0.1), "got -0.1"),
        (lambda: random_horizontal_flip(batch(), gen(0), p=float("nan")), "got nan"),
        (lambda: random_horizontal_flip(torch.zeros(32, 32), gen(0)), "4-D"),
        (lambda: normalize(batch(), (0.5, 0.5, 0.5), (1.0, 0.0, 1.0)), "non-zero"),
        (lambda: normalize(batch(), (0.5,), (1.0,)), "1 mean/std values for 3 channels"),
        (lambda: normalize(batch(), (0.5, 0.5), (1.0,)), "equal length"),
        (lambda: normalize(torch.zeros(3, 4, 4), (0.5,) * 3, (1.0,) * 3), "4-D"),
        (lambda: RandomCrop(32, -2), "got -2"),
        (lambda: RandomHorizontalFlip(2.0), "got 2.0"),
        (lambda: Normalize((0.0,), (0.0,)), "non-zero"),
    ],
)
def test_argument_errors(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


def test_chain_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="callable"):
        chain(RandomCrop(32), 3)  # type: ignore[arg-type]
