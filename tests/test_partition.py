"""Properties of the partitioners in blazefl_fn.data.partition."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from _rng import global_rng_untouched
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.data.partition import (
    Partition,
    dirichlet,
    iid,
    iid_unbalanced,
    inner_dirichlet,
    partition_report,
    quantity_skew,
    shards,
)
from blazefl_fn.keys import Key

Partitioner = Callable[[torch.Tensor, Key], Partition]

NUM_CLIENTS = 5
SHARDS_PER_CLIENT = 3

# name -> (partitioner of (labels, key), the min_size it promises)
PARTITIONERS: dict[str, tuple[Partitioner, int]] = {
    "iid": (lambda y, k: iid(len(y), NUM_CLIENTS, k), 1),
    "iid_unbalanced": (lambda y, k: iid_unbalanced(len(y), NUM_CLIENTS, k, sigma=1.5), 1),
    "dirichlet": (lambda y, k: dirichlet(y, NUM_CLIENTS, 0.5, k, min_size=2), 2),
    "shards": (lambda y, k: shards(y, NUM_CLIENTS, SHARDS_PER_CLIENT, k), 1),
    "inner_dirichlet": (lambda y, k: inner_dirichlet(y, NUM_CLIENTS, 0.3, k), 1),
    "quantity_skew": (lambda y, k: quantity_skew(len(y), NUM_CLIENTS, 0.5, k, min_size=3), 3),
}


def make_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    rng = Key.from_seed(seed).fold_in("labels").numpy_generator()
    return torch.as_tensor(rng.integers(0, num_classes, size=n), dtype=torch.int64)


def expected_rest(name: str, labels: torch.Tensor) -> set[int]:
    """The samples a partitioner leaves in no client by design."""
    if name != "shards":
        return set()
    n = labels.numel()
    rest = n % (NUM_CLIENTS * SHARDS_PER_CLIENT)
    order = torch.argsort(labels, stable=True).tolist()
    return set(order[n - rest :])


def check_structure(partition: Partition, n: int, rest: set[int]) -> None:
    indices = partition.indices
    assert indices.dtype == torch.int64
    assert indices.dim() == 1
    flat = indices.tolist()
    assert len(flat) == len(set(flat)), "an index is in two clients"
    assert set(flat) == set(range(n)) - rest
    assert partition.offsets[0] == 0
    assert partition.offsets[-1] == len(flat)
    assert sum(partition.sizes) == len(flat)
    base_ptr = indices.untyped_storage().data_ptr()
    for i in range(len(partition)):
        client = partition.client(i)
        assert client.untyped_storage().data_ptr() == base_ptr, "client(i) is a copy"
        values = client.tolist()
        assert values == sorted(values)
        assert len(values) == partition.sizes[i]


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@settings(max_examples=25)
@given(
    n=st.integers(50, 400),
    num_classes=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_partitioner_properties(name: str, n: int, num_classes: int, seed: int) -> None:
    partitioner, min_size = PARTITIONERS[name]
    labels = make_labels(n, num_classes, seed)
    before = labels.clone()
    key = Key.from_seed(seed)
    with global_rng_untouched():
        partition = partitioner(labels, key)
    assert torch.equal(labels, before), "labels were mutated"
    assert len(partition) == NUM_CLIENTS
    check_structure(partition, n, expected_rest(name, labels))
    assert min(partition.sizes) >= min_size

    again = partitioner(labels, key)
    assert torch.equal(again.indices, partition.indices)
    assert again.offsets == partition.offsets

    other = partitioner(labels, key.fold_in("other"))
    assert not (
        torch.equal(other.indices, partition.indices) and other.offsets == partition.offsets
    )


def test_iid_sizes_and_sigma_zero_equals_iid() -> None:
    key = Key.from_seed(3)
    assert iid(23, 5, key).sizes == (5, 5, 5, 4, 4)
    plain = iid(103, 7, key)
    flat = iid_unbalanced(103, 7, key, sigma=0.0)
    assert torch.equal(plain.indices, flat.indices)
    assert plain.offsets == flat.offsets


def test_one_client_holds_everything() -> None:
    labels = make_labels(60, 3, 0)
    for partition in (
        iid(60, 1, Key.from_seed(0)),
        dirichlet(labels, 1, 0.1, Key.from_seed(0)),
        inner_dirichlet(labels, 1, 0.1, Key.from_seed(0)),
        quantity_skew(60, 1, 0.1, Key.from_seed(0)),
    ):
        assert partition.client(0).tolist() == list(range(60))


def test_dirichlet_small_alpha_is_skewed() -> None:
    labels = torch.arange(10_000) % 10
    partition = dirichlet(labels, 20, 0.1, Key.from_seed(1))
    report = partition_report(labels, partition)
    dominant = [max(row) / sum(row) > 0.5 for row in report.counts]
    assert sum(dominant) >= 15


def test_dirichlet_large_alpha_is_near_uniform() -> None:
    labels = torch.arange(10_000) % 10
    partition = dirichlet(labels, 10, 1000.0, Key.from_seed(1))
    for row in partition_report(labels, partition).counts:
        shares = np.asarray(row) / sum(row)
        assert np.all(np.abs(shares - 0.1) < 0.03)


def test_dirichlet_mnist_sized() -> None:
    labels = make_labels(60_000, 10, 7)
    partition = dirichlet(labels, 100, 0.3, Key.from_seed(7))
    check_structure(partition, 60_000, set())
    assert min(partition.sizes) >= 10


def test_dirichlet_gives_up_after_max_tries() -> None:
    labels = torch.arange(100) % 2
    with pytest.raises(ValueError, match="min_size=20 could not be met"):
        dirichlet(labels, 5, 0.01, Key.from_seed(0), min_size=20, max_tries=3)


def test_shards_two_per_client_at_most_two_classes() -> None:
    labels = torch.arange(1000) % 10  # 100 per class; shards of 10 never straddle a class
    partition = shards(labels, 50, 2, Key.from_seed(2))
    check_structure(partition, 1000, set())
    for i in range(len(partition)):
        assert len(set(labels[partition.client(i)].tolist())) <= 2


@settings(max_examples=20)
@given(n=st.integers(50, 300), seed=st.integers(0, 2**32 - 1))
def test_shards_at_most_two_label_runs(n: int, seed: int) -> None:
    labels = make_labels(n, 7, seed)
    partition = shards(labels, 6, 2, Key.from_seed(seed))
    order = torch.argsort(labels, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(n)
    for i in range(len(partition)):
        # A client's samples are two shards: at most two runs of the label-sorted order.
        ranks = sorted(position[partition.client(i)].tolist())
        assert len(ranks) == 2 * (n // 12)
        runs = 1 + sum(1 for a, b in itertools.pairwise(ranks) if b != a + 1)
        assert runs <= 2


@settings(max_examples=25)
@given(
    n=st.integers(1, 200),
    num_clients=st.integers(1, 200),
    alpha=st.sampled_from([0.01, 0.1, 1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_inner_dirichlet_never_empty_and_balanced(
    n: int, num_clients: int, alpha: float, seed: int
) -> None:
    if num_clients > n:
        num_clients = n
    labels = make_labels(n, 4, seed)
    partition = inner_dirichlet(labels, num_clients, alpha, Key.from_seed(seed))
    check_structure(partition, n, set())
    assert min(partition.sizes) >= 1
    assert max(partition.sizes) - min(partition.sizes) <= 1


def test_inner_dirichlet_mnist_sized_is_skewed() -> None:
    labels = make_labels(60_000, 10, 5)
    partition = inner_dirichlet(labels, 100, 0.1, Key.from_seed(5))
    check_structure(partition, 60_000, set())
    report = partition_report(labels, partition)
    assert sum(max(row) / sum(row) > 0.5 for row in report.counts) >= 50


@settings(max_examples=25)
@given(
    n=st.integers(1, 500),
    num_clients=st.integers(1, 50),
    alpha=st.sampled_from([0.01, 0.5, 10.0]),
    min_size=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantity_skew_sums_to_n(
    n: int, num_clients: int, alpha: float, min_size: int, seed: int
) -> None:
    if min_size * num_clients > n:
        return
    partition = quantity_skew(n, num_clients, alpha, Key.from_seed(seed), min_size=min_size)
    assert sum(partition.sizes) == n
    assert min(partition.sizes) >= min_size
    check_structure(partition, n, set())


LABELS = make_labels(100, 4, 0)
KEY = Key.from_seed(0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: iid(100, 0, KEY), "num_clients"),
        (lambda: iid(5, 6, KEY), "num_clients=6"),
        (lambda: iid_unbalanced(100, 0, KEY), "num_clients"),
        (lambda: iid_unbalanced(100, 3, KEY, sigma=-1.0), "sigma"),
        (lambda: dirichlet(LABELS, 0, 0.5, KEY), "num_clients"),
        (lambda: dirichlet(LABELS, 3, 0.0, KEY), "alpha"),
        (lambda: dirichlet(LABELS, 3, -1.0, KEY), "alpha"),
        (lambda: dirichlet(LABELS, 3, math.nan, KEY), "alpha"),
        (lambda: dirichlet(LABELS, 3, math.inf, KEY), "alpha"),
        (lambda: dirichlet(LABELS, 11, 0.5, KEY, min_size=10), "min_size=10"),
        (lambda: dirichlet(torch.zeros(0, dtype=torch.int64), 3, 0.5, KEY), "non-empty"),
        (lambda: dirichlet(torch.tensor([0, -1, 2]), 1, 0.5, KEY), "non-negative"),
        (lambda: dirichlet(LABELS.float(), 3, 0.5, KEY), "int64"),
        (lambda: shards(LABELS, 0, 2, KEY), "num_clients"),
        (lambda: shards(LABELS, 3, 0, KEY), "shards_per_client"),
        (lambda: shards(LABELS, 51, 2, KEY), "num_shards"),
        (lambda: shards(torch.zeros(0, dtype=torch.int64), 1, 1, KEY), "non-empty"),
        (lambda: inner_dirichlet(LABELS, 0, 0.5, KEY), "num_clients"),
        (lambda: inner_dirichlet(LABELS, 101, 0.5, KEY), "num_clients=101"),
        (lambda: inner_dirichlet(LABELS, 3, 0.0, KEY), "alpha"),
        (lambda: inner_dirichlet(LABELS, 3, math.nan, KEY), "alpha"),
        (lambda: quantity_skew(100, 0, 0.5, KEY), "num_clients"),
        (lambda: quantity_skew(100, 3, -1.0, KEY), "alpha"),
        (lambda: quantity_skew(100, 3, math.nan, KEY), "alpha"),
        (lambda: quantity_skew(100, 11, 0.5, KEY, min_size=10), "min_size=10"),
    ],
)
def test_impossible_requests_raise(call: Callable[[], Partition], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_partition_validation() -> None:
    indices = torch.arange(4)
    with pytest.raises(ValueError, match="start at 0"):
        Partition(indices, (1, 4))
    with pytest.raises(ValueError, match="non-decreasing"):
        Partition(indices, (0, 3, 2, 4))
    with pytest.raises(ValueError, match="end at"):
        Partition(indices, (0, 3))
    with pytest.raises(ValueError, match="int64"):
        Partition(indices.int(), (0, 4))
    with pytest.raises(IndexError):
        Partition(indices, (0, 4)).client(1)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_partition_report(name: str) -> None:
    labels = make_labels(307, 6, 1)
    partition = PARTITIONERS[name][0](labels, Key.from_seed(1))
    report = partition_report(labels, partition, num_classes=7)
    assert report.num_classes == 7
    assert report.sizes == partition.sizes
    assert tuple(sum(row) for row in report.counts) == partition.sizes
    assigned = labels[partition.indices]
    per_class = torch.bincount(assigned, minlength=7).tolist()
    assert [sum(col) for col in zip(*report.counts, strict=True)] == per_class
    assert report.unassigned == len(expected_rest(name, labels))
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == ["client", "size", *(f"c{c}" for c in range(7))]
    assert len(lines) == 1 + NUM_CLIENTS + 2
    assert lines[-2].split()[:2] == ["total", str(sum(partition.sizes))]
    assert lines[-1] == f"unassigned {report.unassigned}"
    assert len({len(line) for line in lines[:-1]}) == 1, "columns are not aligned"


def test_partition_report_rejects_small_num_classes() -> None:
    labels = make_labels(50, 4, 0)
    with pytest.raises(ValueError, match="num_classes=2"):
        partition_report(labels, iid(50, 2, KEY), num_classes=2)
