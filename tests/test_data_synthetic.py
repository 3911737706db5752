"""Tests for the Synthetic(alpha, beta) federated benchmark."""

from __future__ import annotations

import functools
import math
import pickle
import re
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from _memory import traced_peak
from _rng import global_rng_untouched
from hypothesis import given, settings
from hypothesis import strategies as st

import blazefl_fn as fl
from blazefl_fn.data import ClientData, FederatedDataset, SyntheticClients, TensorDataset, synthetic
from blazefl_fn.data.synthetic import _test_count
from blazefl_fn.executors import Processes, Sequential, Threads
from blazefl_fn.executors.devices import to_device
from blazefl_fn.keys import Key
from blazefl_fn.models import intra_op_threads, logistic_regression


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


# -- lazy clients ----------------------------------------------------------------------------

# (alpha, beta, dim, num_classes, max_samples, test_fraction)
SETTINGS = [
    (1.0, 1.0, 60, 10, 1000, 0.2),
    (0.0, 0.0, 12, 4, 60, 0.0),
    (0.5, 2.0, 5, 2, 300, 0.5),
    (3.0, 0.25, 1, 3, 50, 0.9),
]


def _rows(client: ClientData) -> tuple[torch.Tensor, torch.Tensor]:
    return client.base.x[client.indices], client.base.y[client.indices]


def _same_data(eager: ClientData, lazy: ClientData, batch_size: int, seed: int) -> None:
    """Bitwise the same rows, and the same batches for the same generator."""
    ex, ey = _rows(eager)
    lx, ly = _rows(lazy)
    assert ex.dtype == lx.dtype == torch.float32
    assert ey.dtype == ly.dtype == torch.int64
    assert torch.equal(ex, lx)
    assert torch.equal(ey, ly)
    assert len(eager) == len(lazy)
    eager_batches = list(eager.batches(batch_size, Key.from_seed(seed).torch_generator()))
    lazy_batches = list(lazy.batches(batch_size, Key.from_seed(seed).torch_generator()))
    assert len(eager_batches) == len(lazy_batches)
    for (bx, by), (cx, cy) in zip(eager_batches, lazy_batches, strict=True):
        assert torch.equal(bx, cx)
        assert torch.equal(by, cy)


def _same_dataset(a: TensorDataset, b: TensorDataset) -> None:
    assert a.x.dtype == b.x.dtype
    assert a.x.shape == b.x.shape
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.y, b.y)


@pytest.mark.parametrize(
    ("alpha", "beta", "dim", "num_classes", "max_samples", "fraction"), SETTINGS
)
def test_lazy_clients_equal_eager_clients_bit_for_bit(
    alpha: float, beta: float, dim: int, num_classes: int, max_samples: int, fraction: float
) -> None:
    kwargs: dict[str, Any] = {
        "dim": dim, "num_classes": num_classes, "max_samples": max_samples,
        "test_fraction": fraction,
    }  # fmt: skip
    key = Key.from_seed(11)
    eager = synthetic(alpha, beta, 7, key, **kwargs)
    lazy = synthetic(alpha, beta, 7, key, lazy=True, test_clients=7, **kwargs)
    assert isinstance(lazy.clients, SyntheticClients)
    assert isinstance(eager.clients, tuple)
    assert (lazy.name, lazy.num_classes, lazy.input_shape, lazy.public) == (
        eager.name, eager.num_classes, eager.input_shape, eager.public,
    )  # fmt: skip
    assert len(lazy.clients) == len(eager.clients) == 7
    for k in range(7):
        lazy_client = lazy.clients[k]
        # A lazy client holds its own rows only, in order.
        assert torch.equal(lazy_client.indices, torch.arange(len(lazy_client)))
        assert len(lazy_client.base) == len(lazy_client)
        _same_data(eager.clients[k], lazy_client, batch_size=7, seed=k)
    _same_dataset(eager.test, lazy.test)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    alpha=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
    beta=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
    dim=st.integers(1, 24),
    num_classes=st.integers(2, 8),
    max_samples=st.integers(50, 300),
    test_fraction=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.5, 0.9]),
    num_clients=st.integers(1, 6),
    batch_size=st.integers(1, 64),
    data=st.data(),
)
def test_lazy_and_eager_agree_property(
    seed: int,
    alpha: float,
    beta: float,
    dim: int,
    num_classes: int,
    max_samples: int,
    test_fraction: float,
    num_clients: int,
    batch_size: int,
    data: st.DataObject,
) -> None:
    kwargs: dict[str, Any] = {
        "dim": dim, "num_classes": num_classes, "max_samples": max_samples,
        "test_fraction": test_fraction,
    }  # fmt: skip
    key = Key.from_seed(seed)
    test_clients = data.draw(st.integers(1, num_clients), label="test_clients")
    eager = synthetic(alpha, beta, num_clients, key, test_clients=test_clients, **kwargs)
    lazy = synthetic(alpha, beta, num_clients, key, lazy=True, test_clients=test_clients, **kwargs)
    for k in range(num_clients):
        _same_data(eager.clients[k], lazy.clients[k], batch_size, seed=seed + k)
    _same_dataset(eager.test, lazy.test)


@pytest.mark.parametrize("test_clients", [1, 3, 6])
def test_test_set_is_the_held_out_rows_of_the_first_test_clients(test_clients: int) -> None:
    key = Key.from_seed(4)
    lazy = synthetic(1.0, 1.0, 6, key, lazy=True, test_clients=test_clients)
    eager = synthetic(1.0, 1.0, 6, key, test_clients=test_clients)
    # The same rows as the eager federation of just those clients (all of whose rows it holds).
    prefix = synthetic(1.0, 1.0, test_clients, key)
    _same_dataset(lazy.test, eager.test)
    _same_dataset(eager.test, prefix.test)
    # The training data does not depend on the test set.
    everything = synthetic(1.0, 1.0, 6, key)
    assert torch.equal(eager.clients[0].base.x, everything.clients[0].base.x)


def test_default_test_clients() -> None:
    key = Key.from_seed(2)
    # Eager: every client; lazy: every client up to 1000.
    _same_dataset(synthetic(1.0, 1.0, 5, key).test, synthetic(1.0, 1.0, 5, key, lazy=True).test)
    _same_dataset(
        synthetic(1.0, 1.0, 5, key).test, synthetic(1.0, 1.0, 5, key, test_clients=5).test
    )


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("test_clients", [0, -1, 4])
def test_test_clients_out_of_range_is_refused(lazy: bool, test_clients: int) -> None:
    with pytest.raises(
        ValueError, match=rf"test_clients must be in \[1, num_clients=3\], got {test_clients}"
    ):
        synthetic(1.0, 1.0, 3, Key.from_seed(0), lazy=lazy, test_clients=test_clients)


def test_lazy_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"alpha.*-1"):
        synthetic(-1.0, 1.0, 3, Key.from_seed(0), lazy=True)
    with pytest.raises(ValueError, match=r"num_clients.*0"):
        SyntheticClients(1.0, 1.0, 0, Key.from_seed(0))
    with pytest.raises(TypeError, match="device"):
        SyntheticClients(1.0, 1.0, 3, Key.from_seed(0), device="cpu")  # type: ignore[arg-type]


def test_len_and_indexing_are_a_tuple_s() -> None:
    key = Key.from_seed(9)
    eager = synthetic(1.0, 1.0, 5, key)
    clients = synthetic(1.0, 1.0, 5, key, lazy=True).clients
    assert isinstance(clients, Sequence)
    assert isinstance(clients, SyntheticClients)
    assert len(clients) == 5
    for k in range(-5, 5):
        _same_data(eager.clients[k], clients[k], batch_size=10, seed=0)
    # numpy integers index too
    _same_data(eager.clients[3], clients[np.int64(3)], batch_size=10, seed=0)
    for bad in (5, 6, -6, 10**9):
        with pytest.raises(IndexError, match=f"client index {bad} is out of range for 5 clients"):
            clients[bad]
    with pytest.raises(TypeError):
        clients["1"]  # type: ignore[call-overload]
    # A slice is a list of the clients it selects.
    sliced = clients[3:0:-2]
    assert isinstance(sliced, list)
    assert len(sliced) == 2
    for client, k in zip(sliced, [3, 1], strict=True):
        _same_data(eager.clients[k], client, batch_size=10, seed=0)
    assert clients[7:] == []
    # The Sequence mixins work (generating the clients they pass).
    assert len(list(clients)) == 5
    assert [len(c) for c in reversed(clients)] == [len(c) for c in eager.clients][::-1]


def test_each_read_generates_the_client_again() -> None:
    clients = SyntheticClients(1.0, 1.0, 3, Key.from_seed(0))
    first, again = clients[1], clients[1]
    assert first is not again
    assert first.base is not again.base
    _same_data(first, again, batch_size=4, seed=1)
    with global_rng_untouched():
        clients[2]


def test_first_is_the_prefix() -> None:
    key = Key.from_seed(6)
    clients = SyntheticClients(0.5, 0.5, 1_000_000, key, dim=8)
    prefix = clients.first(3)
    assert prefix == SyntheticClients(0.5, 0.5, 3, key, dim=8)
    assert len(prefix) == 3
    eager = synthetic(0.5, 0.5, 3, key, dim=8)
    for k in range(3):
        _same_data(eager.clients[k], prefix[k], batch_size=5, seed=k)
        _same_data(eager.clients[k], clients[k], batch_size=5, seed=k)
    for bad in (0, 1_000_001):
        with pytest.raises(ValueError, match=f"got {bad}"):
            clients.first(bad)


def test_pickling_round_trip_is_equal_and_small() -> None:
    clients = synthetic(0.5, 2.0, 1_000_000, Key.from_seed(1), lazy=True, test_clients=2).clients
    assert isinstance(clients, SyntheticClients)
    payload = pickle.dumps(clients)
    assert len(payload) < 1000
    back = pickle.loads(payload)
    assert back == clients
    assert hash(back) == hash(clients)
    assert back != clients.first(999_999)
    for k in (0, 123_456, -1):
        _same_data(clients[k], back[k], batch_size=16, seed=abs(k))


def test_to_device_keeps_the_record_on_its_device() -> None:
    clients = SyntheticClients(1.0, 1.0, 4, Key.from_seed(0))
    cpu = torch.device("cpu")
    assert to_device(clients, cpu) is clients
    assert clients.to_device(cpu) is clients
    assert clients[0].base.x.device == cpu


def test_a_million_lazy_clients_build_in_well_under_a_second_in_little_memory() -> None:
    key = Key.from_seed(0)
    synthetic(1.0, 1.0, 1_000_000, key, lazy=True, test_clients=1)  # warm up imports
    start = time.perf_counter()
    with traced_peak() as peak:
        fd = synthetic(1.0, 1.0, 1_000_000, key, lazy=True, test_clients=10)
    seconds = time.perf_counter() - start
    assert len(fd.clients) == 1_000_000
    # O(1) in num_clients: an O(num_clients) loop of a microsecond per client takes a second.
    assert seconds < 0.5, seconds
    assert peak.bytes < 4 * 2**20, peak.bytes  # one client's generation, and 10 test shares
    # The default test set (the first 1000 clients' held-out rows) is the one eager data has.
    with traced_peak() as peak:
        default = synthetic(1.0, 1.0, 1_000_000, key, lazy=True)
    assert peak.bytes < 64 * 2**20, peak.bytes
    _same_dataset(default.test, synthetic(1.0, 1.0, 1000, key).test)
    last = default.clients[-1]
    assert 1 <= len(last) <= 1000


VECTORIZED = functools.partial(fl.Vectorized, 5)


def _fedavg_digest(clients: Sequence[ClientData], executor: fl.Executor, dim: int) -> str:
    model_fn = functools.partial(logistic_regression, (dim,), 10)
    algo = fl.fedavg(
        model_fn, num_clients=len(clients), clients_per_round=5, local=fl.LocalSGD(batch_size=8)
    )
    key = Key.from_seed(5)
    with executor:
        state, reports = fl.run_rounds(
            fl.make_round(algo, clients, executor), algo.init(key), key, until=3
        )
    assert len(reports) == 3
    return fl.tree.digest(state.params)


@pytest.mark.parametrize(
    "make_executor",
    [
        Sequential,
        functools.partial(Threads, 2),
        functools.partial(Processes, 2),
        # Two device entries: clients go through `Placement`, which must not keep lazy ones.
        functools.partial(Sequential, devices=("cpu", "cpu")),
        VECTORIZED,
    ],
    ids=["sequential", "threads2", "processes2", "placed", "vectorized"],
)
def test_fedavg_over_lazy_clients_gives_the_eager_bits(make_executor: Any) -> None:
    key = Key.from_seed(8)
    eager = synthetic(1.0, 1.0, 12, key, dim=20, max_samples=200)
    lazy = synthetic(1.0, 1.0, 12, key, dim=20, max_samples=200, lazy=True)
    # One intra-op thread here, as in the worker processes: the same kernels everywhere.
    with intra_op_threads(1):
        reference = _fedavg_digest(eager.clients, make_executor(), dim=20)
        assert _fedavg_digest(lazy.clients, make_executor(), dim=20) == reference
        if make_executor is not VECTORIZED:  # it rounds otherwise, as documented
            assert _fedavg_digest(eager.clients, Sequential(), dim=20) == reference


def test_placement_does_not_keep_lazy_clients() -> None:
    key = Key.from_seed(8)
    lazy = synthetic(1.0, 1.0, 6, key, dim=4, lazy=True, test_clients=1)
    eager = synthetic(1.0, 1.0, 6, key, dim=4)
    counts: dict[str, dict[tuple[int, int], int]] = {}
    for name, data in (("lazy", lazy), ("eager", eager)):
        executor = Sequential(devices=("cpu", "cpu"))
        model_fn = functools.partial(logistic_regression, (4,), 10)
        algo = fl.fedavg(model_fn, num_clients=6, clients_per_round=4, local=fl.LocalSGD())
        with executor:
            fl.run_rounds(fl.make_round(algo, data.clients, executor), algo.init(key), key, until=4)
            counts[name] = executor.placements
    # Eager clients are placed once each; lazy ones at every round that samples them.
    assert set(counts["eager"].values()) == {1}
    assert sum(counts["lazy"].values()) == 4 * 4
    assert counts["lazy"].keys() == counts["eager"].keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 10.0}, "num_clients must be an int, got 10.0"),
        ({"num_clients": True}, "num_clients must be an int, got True"),
        ({"dim": 6.5}, "dim must be an int, got 6.5"),
        ({"max_samples": "100"}, "max_samples must be an int, got '100'"),
        ({"key": 3}, "key must be a Key, got int"),
        ({"test_clients": 2.5}, "test_clients must be an int, got 2.5"),
        ({"test_clients": True}, "test_clients must be an int, got True"),
        ({"lazy": 1}, "lazy must be a bool, got 1"),
    ],
)
def test_arguments_of_the_wrong_type_are_refused(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"num_clients": 4, "key": Key.from_seed(0), **kwargs}
    with pytest.raises(TypeError, match=re.escape(message)):
        synthetic(1.0, 1.0, **arguments)
    with pytest.raises(TypeError, match=r"n must be an int, got 2\.5"):
        SyntheticClients(1.0, 1.0, 4, Key.from_seed(0)).first(2.5)  # pyright: ignore[reportArgumentType]
