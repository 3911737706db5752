"""Tests for the Synthetic(alpha, beta) federated benchmark."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from _rng import global_rng_untouched
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.data import FederatedDataset, synthetic
from blazefl_fn.data.synthetic import _test_count
from blazefl_fn.keys import Key


def _train_size(n: int, test_fraction: float) -> int:
    # Exact decimal arithmetic: the split must not depend on binary float noise.
    return max(1, n - math.floor(Fraction(str(test_fraction)) * n))


def _client_tensors(fd: FederatedDataset, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    client = fd.clients[k]
    return client.base.x[client.indices], client.base.y[client.indices]


def test_same_key_is_bitwise_identical() -> None:
    a = synthetic(1.0, 1.0, 8, Key.from_seed(3))
    b = synthetic(1.0, 1.0, 8, Key.from_seed(3))
    base_a, base_b = a.clients[0].base, b.clients[0].base
    assert torch.equal(base_a.x, base_b.x)
    assert torch.equal(base_a.y, base_b.y)
    assert torch.equal(a.test.x, b.test.x)
    assert torch.equal(a.test.y, b.test.y)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        assert torch.equal(ca.indices, cb.indices)


def test_different_key_differs() -> None:
    a = synthetic(1.0, 1.0, 4, Key.from_seed(0))
    b = synthetic(1.0, 1.0, 4, Key.from_seed(1))
    xa, _ = _client_tensors(a, 0)
    xb, _ = _client_tensors(b, 0)
    assert xa.shape != xb.shape or not torch.equal(xa, xb)


def test_client_data_is_prefix_stable() -> None:
    small = synthetic(0.5, 0.5, 3, Key.from_seed(7))
    large = synthetic(0.5, 0.5, 9, Key.from_seed(7))
    for k in range(3):
        xs, ys = _client_tensors(small, k)
        xl, yl = _client_tensors(large, k)
        assert torch.equal(xs, xl)
        assert torch.equal(ys, yl)
    n_test = len(small.test)
    assert torch.equal(small.test.x, large.test.x[:n_test])
    assert torch.equal(small.test.y, large.test.y[:n_test])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    num_clients=st.integers(1, 6),
    test_fraction=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.5, 0.9]),
    max_samples=st.integers(50, 400),
)
def test_sizes_and_split(
    seed: int, num_clients: int, test_fraction: float, max_samples: int
) -> None:
    key = Key.from_seed(seed)
    fd = synthetic(1.0, 1.0, num_clients, key, test_fraction=test_fraction, max_samples=max_samples)
    # With no test split, each client holds all of its samples, in generation order.
    full = synthetic(1.0, 1.0, num_clients, key, test_fraction=0.0, max_samples=max_samples)
    assert len(full.test) == 0
    assert len(fd.clients) == num_clients
    test_x: list[torch.Tensor] = []
    test_y: list[torch.Tensor] = []
    for k in range(num_clients):
        x_all, y_all = _client_tensors(full, k)
        n = len(y_all)
        assert 50 <= n <= max_samples
        n_train = _train_size(n, test_fraction)
        x, y = _client_tensors(fd, k)
        assert len(y) == n_train
        assert torch.equal(x, x_all[:n_train])
        assert torch.equal(y, y_all[:n_train])
        test_x.append(x_all[n_train:])
        test_y.append(y_all[n_train:])
    assert torch.equal(fd.test.x, torch.cat(test_x))
    assert torch.equal(fd.test.y, torch.cat(test_y))


def test_cap_is_reached() -> None:
    fd = synthetic(0.0, 0.0, 40, Key.from_seed(0), test_fraction=0.0, max_samples=60)
    sizes = [len(c) for c in fd.clients]
    assert max(sizes) == 60
    assert min(sizes) >= 50


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_shapes_dtypes_labels(alpha: float, beta: float) -> None:
    fd = synthetic(alpha, beta, 5, Key.from_seed(2), dim=12, num_classes=4)
    base = fd.clients[0].base
    assert fd.name == f"synthetic({alpha:g},{beta:g})"
    assert fd.num_classes == 4
    assert fd.input_shape == (12,)
    for ds in (base, fd.test):
        assert ds.x.dtype == torch.float32
        assert ds.y.dtype == torch.int64
        assert ds.x.dim() == 2
        assert ds.x.shape[1] == 12
        assert int(ds.y.min()) >= 0
        assert int(ds.y.max()) < 4
        assert torch.isfinite(ds.x).all()


def test_clients_are_views_onto_one_base() -> None:
    fd = synthetic(1.0, 1.0, 7, Key.from_seed(5))
    base = fd.clients[0].base
    assert all(c.base is base for c in fd.clients)
    for c in fd.clients:
        assert c.indices.dtype == torch.int64
        assert c.indices.dim() == 1
    combined = torch.cat([c.indices for c in fd.clients])
    assert torch.equal(combined.sort().values, torch.arange(len(base)))


def test_name_formatting() -> None:
    assert synthetic(0.25, 2, 1, Key.from_seed(0)).name == "synthetic(0.25,2)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, "alpha.*-0.1"),
        ({"beta": -1.0}, "beta.*-1.0"),
        ({"alpha": float("nan")}, "alpha.*nan"),
        ({"num_clients": 0}, "num_clients.*0"),
        ({"dim": 0}, "dim.*0"),
        ({"num_classes": 1}, "num_classes.*1"),
        ({"test_fraction": 1.0}, r"test_fraction.*1\.0"),
        ({"test_fraction": -0.1}, r"test_fraction.*-0\.1"),
        ({"max_samples": 49}, "max_samples.*49"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"alpha": 1.0, "beta": 1.0, "num_clients": 2, "key": Key.from_seed(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        synthetic(**args)


def test_global_rng_untouched() -> None:
    with global_rng_untouched():
        synthetic(1.0, 1.0, 5, Key.from_seed(0))


@pytest.mark.parametrize(
    ("fraction", "n", "expected"), [(0.2, 55, 11), (0.29, 100, 29), (0.0, 7, 0)]
)
def test_test_count_ignores_float_noise(fraction: float, n: int, expected: int) -> None:
    assert _test_count(fraction, n) == expected
