"""Partitioners: which examples of a shared base dataset each client holds.

Every function is a pure function of (labels or a sample count, parameters, `Key`) and returns a
`Partition`: all clients' indices in one int64 tensor plus offsets, each client's indices sorted
ascending, no index in two clients. Structural shuffles come from ``Key.permutation`` (raw key
bits); continuous draws (Dirichlet, log-normal) from ``Key.numpy_generator`` of a named child key.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from itertools import pairwise

import attrs
import numpy as np
import numpy.typing as npt
import torch

from .._validators import check_int_at_least, check_positive_finite
from ..keys import Key

__all__ = [
    "Partition",
    "PartitionReport",
    "dirichlet",
    "iid",
    "iid_unbalanced",
    "inner_dirichlet",
    "partition_report",
    "quantity_skew",
    "shards",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


# -- the record -------------------------------------------------------------------------------


def _check_partition_indices(_instance: object, _attribute: object, value: object) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype != torch.int64:
        raise ValueError(f"Partition.indices must be a 1-D int64 tensor, got {value!r}")


def _check_offsets(instance: Partition, _attribute: object, value: tuple[int, ...]) -> None:
    if len(value) < 2 or value[0] != 0:
        raise ValueError(f"Partition.offsets must start at 0 and have >= 2 entries, got {value}")
    if any(b < a for a, b in pairwise(value)):
        raise ValueError(f"Partition.offsets must be non-decreasing, got {value}")
    if value[-1] != instance.indices.numel():
        raise ValueError(
            f"Partition.offsets must end at indices.numel()={instance.indices.numel()}, "
            f"got {value[-1]}"
        )


def _to_offsets(value: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@attrs.frozen(eq=False)
class Partition:
    """Which examples each client holds: client i has ``indices[offsets[i]:offsets[i+1]]``.

    ``indices`` is one 1-D int64 tensor holding every client's indices concatenated; within a
    client the indices are sorted ascending, and no index belongs to two clients.
    """

    indices: torch.Tensor = attrs.field(validator=_check_partition_indices)
    offsets: tuple[int, ...] = attrs.field(converter=_to_offsets, validator=_check_offsets)

    def __len__(self) -> int:
        """The number of clients."""
        return len(self.offsets) - 1

    def client(self, i: int) -> torch.Tensor:
        """Client ``i``'s indices: a view (slice) of `indices`, not a copy.

        Raises:
            IndexError: ``i`` is not in ``[0, len(self))``.
        """
        if not 0 <= i < len(self):
            raise IndexError(f"client index {i} out of range for {len(self)} clients")
        return self.indices[self.offsets[i] : self.offsets[i + 1]]

    @property
    def sizes(self) -> tuple[int, ...]:
        """The number of examples of each client."""
        return tuple(b - a for a, b in pairwise(self.offsets))


# -- shared helpers ---------------------------------------------------------------------------


def _check_labels(labels: object) -> IntArray:
    """A private numpy copy of ``labels`` after checking it is 1-D int64, non-empty, >= 0."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be a 1-D int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("labels must be non-empty, got 0 labels")
    # A copy: nothing below can write into the caller's tensor.
    array: IntArray = labels.detach().cpu().numpy().astype(np.int64, copy=True)
    low = int(array.min())
    if low < 0:
        raise ValueError(f"labels must be non-negative, got a label {low}")
    return array


def _check_clients(num_clients: object, num_samples: int, per_client: int = 1) -> int:
    k = check_int_at_least("num_clients", num_clients, 1)
    if k * per_client > num_samples:
        need = "sample" if per_client == 1 else f"{per_client} samples"
        raise ValueError(
            f"num_clients={k} clients need at least {need} each but there are only "
            f"{num_samples} samples"
        )
    return k


def _assemble(owner: IntArray, num_clients: int) -> Partition:
    """The `Partition` where sample ``j`` goes to client ``owner[j]`` (-1: to no client)."""
    # Stable: within a client the indices stay ascending; the unassigned (-1) sort first.
    order = np.argsort(owner, kind="stable").astype(np.int64)
    assigned = owner[owner >= 0]
    counts: IntArray = np.bincount(assigned, minlength=num_clients).astype(np.int64)
    skipped = owner.shape[0] - assigned.shape[0]
    indices = torch.as_tensor(order[skipped:].copy())
    offsets = (0, *np.cumsum(counts).tolist())
    return Partition(indices, offsets)


def _owner_from_sizes(order: IntArray, sizes: IntArray, num_samples: int) -> IntArray:
    """Owners when client ``i`` takes the next ``sizes[i]`` samples of ``order``."""
    owner: IntArray = np.full(num_samples, -1, dtype=np.int64)
    total = int(sizes.sum())
    owner[order[:total]] = np.repeat(np.arange(sizes.shape[0], dtype=np.int64), sizes)
    return owner


def _permutation(key: Key, n: int) -> IntArray:
    return np.asarray(key.permutation(n), dtype=np.int64)


def _shuffled_by_class(labels: IntArray, key: Key, num_classes: int) -> tuple[IntArray, IntArray]:
    """Sample indices grouped by class (class 0 first), each class in a key-shuffled order.

    Returns the grouped indices and the class boundaries (``num_classes + 1`` offsets).
    """
    perm = _permutation(key, labels.shape[0])
    # A uniform permutation, then a stable sort by label: each class's order is uniform.
    grouped = perm[np.argsort(labels[perm], kind="stable")].astype(np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    bounds: IntArray = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return grouped, bounds


def _largest_remainder(weights: FloatArray, total: int) -> IntArray:
    """Integers proportional to ``weights`` summing to ``total`` (Hamilton's method).

    The leftover units go to the largest fractional parts, ties to the lower index.
    """
    quotas: FloatArray = weights / weights.sum() * total
    sizes: IntArray = np.floor(quotas).astype(np.int64)
    left = total - int(sizes.sum())
    if left > 0:
        order = np.argsort(-(quotas - sizes), kind="stable")
        sizes[order[:left]] += 1
    elif left < 0:  # float noise only: take the surplus back from the largest
        order = np.argsort(-sizes, kind="stable")
        sizes[order[:-left]] -= 1
    return sizes


def _balanced_sizes(num_samples: int, num_clients: int) -> IntArray:
    sizes: IntArray = np.full(num_clients, num_samples // num_clients, dtype=np.int64)
    sizes[: num_samples % num_clients] += 1
    return sizes


# -- partitioners -----------------------------------------------------------------------------


def iid(num_samples: int, num_clients: int, key: Key) -> Partition:
    """IID split: a uniform permutation cut into sizes as equal as possible.

    The first ``num_samples % num_clients`` clients get one sample more.

    Args:
        num_samples: Number of samples ``n`` (>= 1); indices are ``range(n)``.
        num_clients: Number of clients (1 <= num_clients <= num_samples).
        key: Source of the permutation (``key.permutation``).

    Raises:
        ValueError: ``num_samples < 1``, ``num_clients < 1`` or more clients than samples.

    Examples:
        >>> from blazefl_fn.keys import Key
        >>> p = iid(10, 3, Key.from_seed(0))
        >>> len(p), p.sizes
        (3, (4, 3, 3))
        >>> sorted(p.indices.tolist()) == list(range(10))
        True
    """
    n = check_int_at_least("num_samples", num_samples, 1)
    k = _check_clients(num_clients, n)
    owner = _owner_from_sizes(_permutation(key, n), _balanced_sizes(n, k), n)
    return _assemble(owner, k)


def iid_unbalanced(
    num_samples: int, num_clients: int, key: Key, *, sigma: float = 1.0
) -> Partition:
    """IID split with client sizes proportional to log-normal(0, sigma) draws.

    Every client gets one sample, the other ``n - num_clients`` are shared out in proportion to
    the draws (from ``key.fold_in("sizes").numpy_generator()``, computed in log space so that no
    draw overflows) by largest-remainder rounding; the samples come from ``key.permutation``.
    ``sigma=0`` gives exactly `iid`.

    Args:
        num_samples: Number of samples ``n`` (>= 1).
        num_clients: Number of clients (1 <= num_clients <= num_samples).
        key: Source of all randomness.
        sigma: Standard deviation of the log-sizes (finite, >= 0).

    Raises:
        ValueError: An argument is out of range.
    """
    n = check_int_at_least("num_samples", num_samples, 1)
    k = _check_clients(num_clients, n)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    logs: FloatArray = key.fold_in("sizes").numpy_generator().normal(0.0, float(sigma), size=k)
    weights: FloatArray = np.exp(logs - logs.max())
    sizes = 1 + _largest_remainder(weights, n - k)
    return _assemble(_owner_from_sizes(_permutation(key, n), sizes, n), k)


def dirichlet(
    labels: torch.Tensor,
    num_clients: int,
    alpha: float,
    key: Key,
    *,
    min_size: int = 10,
    max_tries: int = 100,
) -> Partition:
    """Label-skew split with per-class Dirichlet(alpha) client shares (Hsu et al. 2019).

    Attempt ``t`` uses ``key.fold_in("try").fold_in(t)``: each class's indices are shuffled
    (its ``"shuffle"`` child), and for each class ``c`` in order, proportions
    ``p ~ Dir(alpha * 1_K)`` are drawn (its ``"proportions"`` child's numpy generator); clients
    already holding ``>= n / num_clients`` samples get proportion 0, the rest are renormalised
    (uniform over those clients if all their draws underflowed to 0), and the shuffled class is
    cut at the cumulative proportions. Attempts repeat until every client has ``min_size``
    samples. Every sample is assigned.

    Args:
        labels: 1-D int64 class labels (non-empty, non-negative); not modified.
        num_clients: Number of clients (>= 1).
        alpha: Dirichlet concentration (finite, > 0): small is skewed, large near-uniform.
        key: Source of all randomness.
        min_size: Fewest samples a client may hold (>= 0).
        max_tries: Attempts before giving up (>= 1).

    Raises:
        ValueError: An argument is out of range, ``min_size * num_clients > n``, or no attempt
            in ``max_tries`` met ``min_size``.

    Examples:
        >>> import torch
        >>> from blazefl_fn.keys import Key
        >>> labels = torch.arange(200) % 4
        >>> p = dirichlet(labels, 5, alpha=0.5, key=Key.from_seed(0), min_size=5)
        >>> len(p), sum(p.sizes), min(p.sizes) >= 5
        (5, 200, True)
    """
    y = _check_labels(labels)
    n = int(y.shape[0])
    k = check_int_at_least("num_clients", num_clients, 1)
    a = check_positive_finite("alpha", alpha)
    min_size = check_int_at_least("min_size", min_size, 0)
    max_tries = check_int_at_least("max_tries", max_tries, 1)
    if min_size * k > n:
        raise ValueError(
            f"min_size={min_size} x num_clients={k} = {min_size * k} exceeds the {n} samples"
        )
    num_classes = int(y.max()) + 1
    concentration: FloatArray = np.full(k, a, dtype=np.float64)
    for t in range(max_tries):
        tkey = key.fold_in("try").fold_in(t)
        grouped, bounds = _shuffled_by_class(y, tkey.fold_in("shuffle"), num_classes)
        rng = tkey.fold_in("proportions").numpy_generator()
        held: IntArray = np.zeros(k, dtype=np.int64)
        pieces: list[IntArray] = []
        for c in range(num_classes):
            n_c = int(bounds[c + 1] - bounds[c])
            p: FloatArray = rng.dirichlet(concentration)
            open_ = held < n / k
            p = np.where(open_, p, 0.0)
            total = float(p.sum())
            p = p / total if total > 0 else open_ / float(open_.sum())
            cuts = np.minimum((np.cumsum(p) * n_c).astype(np.int64)[:-1], n_c)
            counts = np.diff(np.concatenate(([0], cuts, [n_c]))).astype(np.int64)
            held += counts
            pieces.append(np.repeat(np.arange(k, dtype=np.int64), counts))
        if int(held.min()) >= min_size:
            owner: IntArray = np.empty(n, dtype=np.int64)
            owner[grouped] = np.concatenate(pieces)
            return _assemble(owner, k)
    raise ValueError(
        f"dirichlet: min_size={min_size} could not be met in max_tries={max_tries} attempts "
        f"(alpha={alpha}, num_clients={k}, {n} samples); use a larger alpha or a smaller min_size"
    )


def shards(labels: torch.Tensor, num_clients: int, shards_per_client: int, key: Key) -> Partition:
    """Pathological non-IID split (McMahan et al. 2017): each client gets label-sorted shards.

    Indices are sorted by label (stable: ties by index) and cut into
    ``num_shards = num_clients * shards_per_client`` shards of ``n // num_shards`` samples; the
    last ``n % num_shards`` samples of the sorted order are left unassigned. Client ``i`` gets
    shards ``perm[i * s:(i + 1) * s]`` with ``perm = key.permutation(num_shards)``.

    Args:
        labels: 1-D int64 class labels (non-empty, non-negative); not modified.
        num_clients: Number of clients (>= 1).
        shards_per_client: Shards per client ``s`` (>= 1).
        key: Source of the shard assignment.

    Raises:
        ValueError: An argument is out of range or ``num_shards > n``.
    """
    y = _check_labels(labels)
    n = int(y.shape[0])
    k = check_int_at_least("num_clients", num_clients, 1)
    s = check_int_at_least("shards_per_client", shards_per_client, 1)
    num_shards = k * s
    if num_shards > n:
        raise ValueError(
            f"num_shards = num_clients x shards_per_client = {num_shards} exceeds the {n} samples"
        )
    shard_size = n // num_shards
    order = np.argsort(y, kind="stable").astype(np.int64)
    shard_owner: IntArray = np.empty(num_shards, dtype=np.int64)
    shard_owner[_permutation(key, num_shards)] = np.arange(num_shards, dtype=np.int64) // s
    owner: IntArray = np.full(n, -1, dtype=np.int64)
    owner[order[: num_shards * shard_size]] = np.repeat(shard_owner, shard_size)
    return _assemble(owner, k)


def inner_dirichlet(labels: torch.Tensor, num_clients: int, alpha: float, key: Key) -> Partition:
    """Client-inner Dirichlet split (FedLab's ``client_inner_dirichlet_partition``).

    Client sizes are balanced (as equal as possible, every sample used). Each client draws class
    priors ``q_i ~ Dir(alpha * 1_C)`` (``key.fold_in("priors")``). Samples are dealt one at a
    time: the clients' slots are visited in a uniform key-driven order
    (``key.fold_in("order")``), and each slot takes the next unused sample of a class drawn from
    the client's prior restricted to classes with samples left and renormalised (uniform over
    those classes if the client's prior gives them no mass). Class pools are shuffled by
    ``key.fold_in("pools")``; the uniforms come from ``key.fold_in("draws")``.

    Args:
        labels: 1-D int64 class labels (non-empty, non-negative); not modified.
        num_clients: Number of clients (1 <= num_clients <= n): no client is ever empty.
        alpha: Dirichlet concentration of the priors (finite, > 0).
        key: Source of all randomness.

    Raises:
        ValueError: An argument is out of range or more clients than samples.
    """
    y = _check_labels(labels)
    n = int(y.shape[0])
    k = _check_clients(num_clients, n)
    a = check_positive_finite("alpha", alpha)
    num_classes = int(y.max()) + 1
    priors: FloatArray = (
        key.fold_in("priors").numpy_generator().dirichlet(np.full(num_classes, a), size=k)
    )
    grouped, bounds = _shuffled_by_class(y, key.fold_in("pools"), num_classes)
    slots = np.repeat(np.arange(k, dtype=np.int64), _balanced_sizes(n, k))
    steps: list[int] = slots[_permutation(key.fold_in("order"), n)].tolist()
    uniforms: list[float] = key.fold_in("draws").numpy_generator().random(n).tolist()

    remaining: list[int] = np.diff(bounds).tolist()
    cursor: list[int] = bounds[:-1].tolist()

    def restricted() -> tuple[list[int], list[list[float]], list[int]]:
        """Available classes, each client's cumulative weights over them, last positive slot."""
        avail = [c for c in range(num_classes) if remaining[c] > 0]
        weights: FloatArray = priors[:, avail]
        dead = weights.sum(axis=1) <= 0
        weights[dead] = 1.0
        cum: FloatArray = np.cumsum(weights, axis=1)
        last = np.argmax(cum >= cum[:, -1:], axis=1)
        return avail, cum.tolist(), last.tolist()

    avail, cum, last = restricted()
    taker: list[int] = [0] * n  # taker[position in grouped]
    for client, u in zip(steps, uniforms, strict=True):
        row = cum[client]
        j = bisect_right(row, u * row[-1])
        if j >= len(row):  # u * total rounded up to total
            j = last[client]
        c = avail[j]
        taker[cursor[c]] = client
        cursor[c] += 1
        remaining[c] -= 1
        if remaining[c] == 0 and any(remaining):
            avail, cum, last = restricted()
    owner: IntArray = np.empty(n, dtype=np.int64)
    owner[grouped] = np.asarray(taker, dtype=np.int64)
    return _assemble(owner, k)


def quantity_skew(
    num_samples: int, num_clients: int, alpha: float, key: Key, *, min_size: int = 1
) -> Partition:
    """IID labels, client sizes from Dirichlet(alpha) proportions.

    Proportions ``p ~ Dir(alpha * 1_K)`` (``key.fold_in("sizes").numpy_generator()``) are
    rounded to sizes by largest remainder; then, one sample at a time, each client below
    ``min_size`` (in client order) takes a sample from the currently largest client (ties: the
    lower index). The samples come from ``key.permutation``. Sizes sum to ``num_samples``.

    Args:
        num_samples: Number of samples ``n`` (>= 1).
        num_clients: Number of clients (>= 1).
        alpha: Dirichlet concentration (finite, > 0): small is skewed, large near-equal.
        key: Source of all randomness.
        min_size: Fewest samples a client may hold (>= 0).

    Raises:
        ValueError: An argument is out of range or ``min_size * num_clients > num_samples``.
    """
    n = check_int_at_least("num_samples", num_samples, 1)
    k = check_int_at_least("num_clients", num_clients, 1)
    a = check_positive_finite("alpha", alpha)
    min_size = check_int_at_least("min_size", min_size, 0)
    if min_size * k > n:
        raise ValueError(
            f"min_size={min_size} x num_clients={k} = {min_size * k} exceeds the {n} samples"
        )
    p: FloatArray = key.fold_in("sizes").numpy_generator().dirichlet(np.full(k, a))
    if not float(p.sum()) > 0:  # every draw underflowed; cannot happen with numpy >= 1.25
        p = np.ones(k, dtype=np.float64)
    sizes: list[int] = _largest_remainder(p, n).tolist()
    for i in range(k):
        while sizes[i] < min_size:
            donor = max(range(k), key=sizes.__getitem__)
            sizes[donor] -= 1
            sizes[i] += 1
    owner = _owner_from_sizes(_permutation(key, n), np.asarray(sizes, dtype=np.int64), n)
    return _assemble(owner, k)


# -- report -----------------------------------------------------------------------------------


@attrs.frozen
class PartitionReport:
    """Per-client class counts of a `Partition`; ``str()`` is an aligned plain-text table."""

    counts: tuple[tuple[int, ...], ...]  # counts[client][class]
    num_classes: int
    unassigned: int

    @property
    def sizes(self) -> tuple[int, ...]:
        """The number of examples of each client."""
        return tuple(sum(row) for row in self.counts)

    def __str__(self) -> str:
        header = ["client", "size", *(f"c{c}" for c in range(self.num_classes))]
        rows = [[str(i), str(sum(row)), *map(str, row)] for i, row in enumerate(self.counts)]
        totals = [sum(col) for col in zip(*self.counts, strict=True)] if self.counts else []
        footer = ["total", str(sum(totals)), *map(str, totals)]
        table = [header, *rows, footer]
        widths = [max(len(line[j]) for line in table) for j in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in table
        ]
        lines.append(f"unassigned {self.unassigned}")
        return "\n".join(lines)


def partition_report(
    labels: torch.Tensor, partition: Partition, num_classes: int | None = None
) -> PartitionReport:
    """How many examples of each class every client of ``partition`` holds.

    Args:
        labels: 1-D int64 class labels of the base dataset (non-empty, non-negative).
        partition: A `Partition` of ``range(len(labels))``.
        num_classes: Number of classes; ``max(labels) + 1`` when None.

    Raises:
        ValueError: ``partition`` indexes outside ``labels``, or a label is ``>= num_classes``.
    """
    y = _check_labels(labels)
    n = int(y.shape[0])
    top = int(y.max()) + 1
    c = top if num_classes is None else check_int_at_least("num_classes", num_classes, 1)
    if top > c:
        raise ValueError(f"num_classes={c} but labels contain the class {top - 1}")
    idx: IntArray = partition.indices.detach().cpu().numpy().astype(np.int64)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"partition indexes outside the {n} labels")
    k = len(partition)
    client_of = np.repeat(np.arange(k, dtype=np.int64), np.asarray(partition.sizes, np.int64))
    flat = np.bincount(client_of * c + y[idx], minlength=k * c).reshape(k, c)
    counts = tuple(tuple(int(v) for v in row) for row in flat.tolist())
    unassigned = n - int(np.unique(idx).size)
    return PartitionReport(counts, c, unassigned)
