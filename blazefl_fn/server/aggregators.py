"""Aggregators: pure functions from client parameter trees and weights to one tree.

Every aggregator has one signature, ``(trees, weights) -> dict[str, Tensor]`` (`Aggregator`),
so algorithms can swap them freely. The shared conventions:

- **Weights** must be finite and ``>= 0`` with at least one positive (else ValueError; a
  non-number is a TypeError). Every aggregator first drops the clients whose weight is zero;
  `mean` then weights the rest by their weights, while the robust aggregators (`median`,
  `TrimmedMean`, `Krum`) treat the remaining clients equally and ignore the weights' values.
  So for all of them a zero-weight client changes nothing and scaling every weight by the same
  positive factor changes nothing (exactly for the robust ones, within rounding for `mean`).
- **Structure**: every tree must have the same names and, per name, the same shape and dtype
  (else ValueError). Results are new tensors with the names in the order of ``trees[0]`` and
  the dtypes of the inputs. Inputs are never written to.
- **Non-floating entries** (e.g. BatchNorm's ``num_batches_tracked``) are aggregated like
  floating ones, in float64, then rounded to nearest (ties to even), so an integer median or
  trimmed mean is an integer between the inputs. Krum measures distances over floating entries
  only and returns the chosen client's integer entries as they are.
- **Determinism**: reductions run in float64 in an order fixed by the values themselves (the
  sorted values of each coordinate, or `math.fsum`), so the robust aggregators give the same
  bits for any order of the clients (Krum orders equal scores by the trees' bytes, not by their
  position). `mean` is `blazefl_fn.tree.weighted_mean`, which sums in the order given:
  permuting clients can move a result by an ulp of its dtype.
- **Zeros** come back as ``+0.0`` from `median`, `TrimmedMean` and Multi-Krum, so the sign of a
  zero cannot depend on the clients' order.

Aggregators that take hyperparameters are frozen attrs records (`TrimmedMean`, `Krum`) and the
others plain module functions, so every aggregator can be pickled to a worker process.

Examples:
    >>> import torch
    >>> trees = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 100.0)]
    >>> median(trees, [1, 1, 1])
    {'w': tensor([2.])}
    >>> trimmed_mean(0.34)(trees, [1, 1, 1])
    {'w': tensor([2.])}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Protocol, cast

import attrs
import torch

from .._validators import check_weights, int_at_least
from ..tree import Params, floating_names, weighted_mean

__all__ = [
    "Aggregator",
    "Krum",
    "TrimmedMean",
    "clip_by_norm",
    "global_norm",
    "krum",
    "krum_scores",
    "mean",
    "median",
    "trimmed_mean",
]

# Squared norms are summed in float64 blocks of this many elements, then the block sums with
# math.fsum: the result depends only on the values, never on torch's thread count.
_BLOCK = 4096


class Aggregator(Protocol):
    """Combines client trees, weighted by ``weights``, into one new tree."""

    def __call__(
        self, trees: Sequence[Params], weights: Sequence[float], /
    ) -> dict[str, torch.Tensor]: ...


def _check_structure(trees: Sequence[Params]) -> None:
    if isinstance(trees, (Mapping, str, bytes)):
        raise TypeError(f"trees must be a sequence of parameter trees, got {type(trees).__name__}")
    if len(trees) == 0:
        raise ValueError("need at least one parameter tree, got an empty sequence")
    first = trees[0]
    for i, tree in enumerate(trees):
        candidate = cast(object, tree)
        if not isinstance(candidate, Mapping):
            raise TypeError(f"trees[{i}] must be a mapping of name -> tensor, got {tree!r}")
        for name, tensor in tree.items():
            value = cast(object, tensor)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"trees[{i}][{name!r}] must be a tensor, got {tensor!r}")
        if tree.keys() != first.keys():
            raise ValueError(
                f"trees[{i}] differs from trees[0] in names: {sorted(set(tree) ^ set(first))}"
            )
        for name in first:
            a, b = first[name], tree[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"entry {name!r} of trees[{i}] is {b.dtype} {tuple(b.shape)} but "
                    f"trees[0] has {a.dtype} {tuple(a.shape)}"
                )


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    checked = check_weights(weights, count)
    if not any(w > 0.0 for w in checked):
        raise ValueError(f"all weights are zero ({list(weights)!r}); at least one must be > 0")
    return checked


def _kept(trees: Sequence[Params], weights: Sequence[float]) -> tuple[list[Params], list[float]]:
    """Validate, then keep the trees with a positive weight (in order) and their weights."""
    _check_structure(trees)
    checked = _check_weights(weights, len(trees))
    pairs = [(t, w) for t, w in zip(trees, checked, strict=True) if w > 0.0]
    return [t for t, _ in pairs], [w for _, w in pairs]


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``values`` in ``dtype``: floating canonicalises -0.0 to +0.0, others round
    half to even and saturate at the dtype's range (never wrap around)."""
    if dtype.is_floating_point:
        return (values + 0.0).to(dtype)
    rounded = values.round()
    if dtype == torch.bool:
        return rounded.to(dtype)
    info = torch.iinfo(dtype)
    high = float(info.max)
    if high > info.max:  # int64's max rounds up to 2**63 in float64: step below it
        high = math.nextafter(high, 0.0)
    return rounded.clamp(min=float(info.min), max=high).to(dtype)


def _sorted_stack(trees: Sequence[Params], name: str) -> torch.Tensor:
    """Each coordinate's values over the clients, ascending along dim 0 (input dtype)."""
    stacked = torch.stack([tree[name].detach() for tree in trees])
    return torch.sort(stacked, dim=0).values


def _mean_of_sorted(rows: torch.Tensor) -> torch.Tensor:
    """The float64 mean along dim 0 of ascending ``rows``, summed in that order.

    Scaled by a power of two so float64 inputs cannot overflow, and clamped to the rows'
    range so the mean of equal values is that value.
    """
    count = rows.shape[0]
    scale = 1.0 / (1 << (count - 1).bit_length())
    as64 = rows.to(torch.float64)
    acc = torch.zeros(rows.shape[1:], dtype=torch.float64, device=rows.device)
    for row in as64:
        acc.add_(row, alpha=scale)
    out = acc / (count * scale)
    return torch.minimum(torch.maximum(out, as64[0]), as64[-1])


def mean(trees: Sequence[Params], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean: `blazefl_fn.tree.weighted_mean` of the positive-weight clients.

    FedAvg's aggregate with ``weights = num_examples``. Accumulated in float64 in the order
    given (bitwise equal to ``weighted_mean`` on finite inputs); integer entries are rounded.

    Raises:
        ValueError: no trees, mismatched structures or lengths, a negative or non-finite
            weight, or all weights zero.
        TypeError: a weight that is not a real number, or a tree that is not name -> tensor.

    Examples:
        >>> import torch
        >>> mean([{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}], [3, 1])
        {'w': tensor([1.])}
    """
    kept, kept_weights = _kept(trees, weights)
    return weighted_mean(kept, kept_weights)


def median(trees: Sequence[Params], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median of the positive-weight clients (weights' values ignored).

    With an odd count each coordinate is one of the inputs' values; with an even count it is
    the mean of the two middle values, computed in float64 as ``lo / 2 + hi / 2`` (no overflow),
    clamped to ``[lo, hi]`` and cast back (integers rounded half to even). Exactly invariant to
    the clients' order. Integers beyond 2**53 lose precision in the even case.

    Raises:
        ValueError: no trees, mismatched structures or lengths, a negative or non-finite
            weight, or all weights zero.
        TypeError: a weight that is not a real number, or a tree that is not name -> tensor.

    Examples:
        >>> import torch
        >>> trees = [{"w": torch.tensor([v, -v])} for v in (4.0, 1.0, 2.0, 9.0)]
        >>> median(trees, [1, 1, 1, 1])
        {'w': tensor([ 3., -3.])}
        >>> median(trees, [0, 1, 1, 1])  # the zero-weight client is dropped
        {'w': tensor([ 2., -2.])}
    """
    kept, _ = _kept(trees, weights)
    count = len(kept)
    out: dict[str, torch.Tensor] = {}
    for name in kept[0]:
        ordered = _sorted_stack(kept, name)
        dtype = ordered.dtype
        if count % 2 == 1:
            middle = ordered[count // 2]
            out[name] = (middle + 0.0).to(dtype) if dtype.is_floating_point else middle.clone()
            continue
        lo = ordered[count // 2 - 1].to(torch.float64)
        hi = ordered[count // 2].to(torch.float64)
        mid = torch.minimum(torch.maximum(lo * 0.5 + hi * 0.5, lo), hi)
        out[name] = _cast(mid, dtype)
    return out


def _check_beta(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and 0.0 <= float(value) < 0.5
    )
    if not ok:
        raise ValueError(f"{attribute.name} must be a number in [0, 0.5), got {value!r}")


@attrs.frozen
class TrimmedMean:
    """The coordinate-wise trimmed mean (weights' values ignored); see `trimmed_mean`.

    Attributes:
        beta: the fraction trimmed from each side, in ``[0, 0.5)``.
    """

    beta: float = attrs.field(validator=_check_beta)

    def trimmed(self, count: int) -> int:
        """How many values are dropped from each side of ``count``: ``floor(beta * count)``.

        ``beta`` is read as the decimal it prints as, so ``0.29 * 100`` trims 29.

        Examples:
            >>> TrimmedMean(0.29).trimmed(100), TrimmedMean(0.2).trimmed(9)
            (29, 1)
        """
        return math.floor(Fraction(repr(float(self.beta))) * count)

    def __call__(
        self, trees: Sequence[Params], weights: Sequence[float], /
    ) -> dict[str, torch.Tensor]:
        """Aggregate; see `trimmed_mean`."""
        kept, _ = _kept(trees, weights)
        count = len(kept)
        cut = self.trimmed(count)
        out: dict[str, torch.Tensor] = {}
        for name in kept[0]:
            ordered = _sorted_stack(kept, name)
            out[name] = _cast(_mean_of_sorted(ordered[cut : count - cut]), ordered.dtype)
        return out


def trimmed_mean(beta: float) -> TrimmedMean:
    """The coordinate-wise ``beta``-trimmed mean (Yin et al. 2018) as an `Aggregator`.

    Of the ``n`` positive-weight clients, each coordinate drops its ``floor(beta * n)``
    largest and smallest values and averages the rest unweighted, summing in float64 in
    ascending order (exactly invariant to the clients' order). The result lies within the
    kept values' range; integers are rounded. With at most ``floor(beta * n)`` corrupted
    clients every coordinate stays within the honest clients' range.

    Raises:
        ValueError: ``beta`` is not in ``[0, 0.5)``; when called, as `median`.

    Examples:
        >>> import torch
        >>> trees = [{"w": torch.tensor([v])} for v in (-50.0, 1.0, 2.0, 3.0, 1e9)]
        >>> trimmed_mean(0.2)(trees, [1.0] * 5)
        {'w': tensor([2.])}
    """
    return TrimmedMean(beta)


def _block_sums_of_squares(values: torch.Tensor) -> list[float]:
    flat = values.detach().reshape(-1).to(torch.float64)
    pad = -flat.numel() % _BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    sums: list[float] = (flat * flat).reshape(-1, _BLOCK).sum(dim=1).cpu().numpy().tolist()
    return sums


def _fsum(values: list[float]) -> float:
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def global_norm(tree: Params) -> float:
    """The L2 norm of all floating entries together, computed in float64.

    The sum of squares is formed in fixed blocks and added with `math.fsum`, so it does not
    depend on torch's thread count. Non-floating entries are ignored.

    Raises:
        ValueError: an entry holds a NaN or an infinity.

    Examples:
        >>> import torch
        >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)})
        5.0
    """
    names = floating_names(tree)
    for name in names:
        if not bool(torch.isfinite(tree[name]).all()):
            raise ValueError(f"entry {name!r} holds non-finite values")
    partials: list[float] = []
    for name in names:
        partials.extend(_block_sums_of_squares(tree[name]))
    squared = _fsum(partials)
    if math.isfinite(squared):
        return math.sqrt(squared)
    # float64 squares overflowed (only huge float64 trees get here): rescale by the largest
    # magnitude first.
    largest = max(float(tree[name].detach().abs().max()) for name in names if tree[name].numel())
    partials = []
    for name in names:
        partials.extend(_block_sums_of_squares(tree[name].to(torch.float64) / largest))
    return largest * math.sqrt(_fsum(partials))


def clip_by_norm(tree: Params, max_norm: float) -> dict[str, torch.Tensor]:
    """``tree`` scaled so its `global_norm` is at most ``max_norm`` (a new tree).

    Meant for a client's delta (its params minus the global params) before aggregation, as in
    DP-FedAvg. A tree already within the bound is returned as an exact copy; otherwise every
    floating entry is multiplied by ``max_norm / norm`` in float64 and cast back, so the
    clipped norm equals ``max_norm`` up to the rounding of the entries' dtype. Non-floating
    entries are copied unchanged.

    Raises:
        ValueError: ``max_norm`` is not a finite number > 0, or the tree holds NaN/inf.
        TypeError: ``max_norm`` is not a real number.

    Examples:
        >>> import torch
        >>> clip_by_norm({"w": torch.tensor([3.0, 4.0])}, 1.0)
        {'w': tensor([0.6000, 0.8000])}
    """
    bound = cast(object, max_norm)
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
        raise TypeError(f"max_norm must be a real number, got {max_norm!r}")
    limit = float(bound)
    if not (math.isfinite(limit) and limit > 0.0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    norm = global_norm(tree)
    if norm <= limit:
        return {name: t.detach().clone() for name, t in tree.items()}
    factor = limit / norm
    return {
        name: (t.detach().to(torch.float64) * factor).to(t.dtype)
        if t.dtype.is_floating_point
        else t.detach().clone()
        for name, t in tree.items()
    }


def _raw_bytes(tree: Params, names: Sequence[str]) -> tuple[bytes, ...]:
    """Each entry's raw bytes, in ``names`` order: a total order for breaking ties."""
    out: list[bytes] = []
    for name in names:
        flat = tree[name].detach().cpu().contiguous().reshape(-1)
        out.append(flat.view(torch.uint8).numpy().tobytes())
    return tuple(out)


def _squared_distance(a: Params, b: Params, names: Sequence[str]) -> float:
    partials: list[float] = []
    for name in names:
        diff = a[name].detach().to(torch.float64) - b[name].detach().to(torch.float64)
        partials.extend(_block_sums_of_squares(diff))
    return _fsum(partials)


def krum_scores(trees: Sequence[Params], f: int) -> list[float]:
    """Krum scores (Blanchard et al. 2017): per tree, the sum of the squared L2 distances to its
    ``n - f - 2`` nearest other trees, over floating entries, in float64.

    Distances are symmetric to the bit and the sums are `math.fsum`, so permuting the trees
    permutes the scores exactly. No weights: every given tree counts.

    Raises:
        ValueError: ``f < 0``, ``n <= 2f + 2``, or the structures differ.

    Examples:
        >>> import torch
        >>> trees = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0, 10.0)]
        >>> krum_scores(trees, 0)
        [10.0, 5.0, 13.0, 130.0]
    """
    _check_structure(trees)
    count = len(trees)
    fault = cast(object, f)
    if isinstance(fault, bool) or not isinstance(fault, int) or f < 0:
        raise ValueError(f"f must be an integer >= 0, got {f!r}")
    if count <= 2 * f + 2:
        raise ValueError(f"Krum needs n > 2f + 2 clients, got n={count}, f={f}")
    names = floating_names(trees[0])
    dist = [[0.0] * count for _ in range(count)]
    for i in range(count):
        for j in range(i + 1, count):
            dist[i][j] = dist[j][i] = _squared_distance(trees[i], trees[j], names)
    nearest = count - f - 2
    return [
        _fsum(sorted(dist[i][j] for j in range(count) if j != i)[:nearest]) for i in range(count)
    ]


@attrs.frozen
class Krum:
    """Krum / Multi-Krum (weights' values ignored); see `krum`.

    Attributes:
        f: the number of Byzantine clients tolerated (``n > 2f + 2`` required when called).
        m: how many best-scored clients are averaged; 1 is plain Krum.
    """

    f: int = attrs.field(validator=int_at_least(0))
    m: int = attrs.field(default=1, validator=int_at_least(1))

    def select(self, trees: Sequence[Params]) -> list[int]:
        """Indices of the ``m`` lowest `krum_scores`, best first.

        Equal scores are ordered by the trees' raw bytes (entry by entry, in name order), then
        by index, so the chosen *trees* do not depend on the order they are given in.

        Raises:
            ValueError: ``n <= 2f + 2`` or ``m > n``.

        Examples:
            >>> import torch
            >>> trees = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0, 10.0)]
            >>> Krum(f=0, m=2).select(trees)
            [1, 0]
        """
        scores = krum_scores(trees, self.f)
        if self.m > len(trees):
            raise ValueError(f"Krum's m must be <= n, got m={self.m}, n={len(trees)}")
        order = sorted(range(len(trees)), key=lambda i: scores[i])
        chosen: list[int] = []
        start = 0
        while len(chosen) < self.m:
            end = start + 1
            while end < len(order) and scores[order[end]] == scores[order[start]]:
                end += 1
            group = order[start:end]
            if len(group) > 1:
                names = list(trees[0])
                group.sort(key=lambda i: (_raw_bytes(trees[i], names), i))
            chosen.extend(group)
            start = end
        return chosen[: self.m]

    def __call__(
        self, trees: Sequence[Params], weights: Sequence[float], /
    ) -> dict[str, torch.Tensor]:
        """Aggregate; see `krum`."""
        kept, _ = _kept(trees, weights)
        chosen = self.select(kept)
        if len(chosen) == 1:
            best = kept[chosen[0]]
            return {name: best[name].detach().clone() for name in kept[0]}
        selected = [kept[i] for i in chosen]
        out: dict[str, torch.Tensor] = {}
        for name in kept[0]:
            ordered = _sorted_stack(selected, name)
            out[name] = _cast(_mean_of_sorted(ordered), ordered.dtype)
        return out


def krum(f: int, m: int = 1) -> Krum:
    """Krum (Blanchard et al. 2017) as an `Aggregator`; Multi-Krum when ``m > 1``.

    Among the ``n`` positive-weight clients, scores each by `krum_scores` and, with ``m == 1``,
    returns an exact (bitwise) copy of the best-scored client's tree; with ``m > 1`` the
    unweighted mean of the ``m`` best (summed per coordinate in ascending order; integers
    rounded). Equal scores are ordered by the trees' raw bytes, then by index (see
    `Krum.select`), so the result is exactly invariant to the clients' order, ties included.
    Requires ``n > 2f + 2`` when called.

    Raises:
        ValueError: ``f < 0`` or ``m < 1``; when called, ``n <= 2f + 2`` (naming n and f),
            ``m > n``, or as `median`.

    Examples:
        >>> import torch
        >>> trees = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0, 10.0)]
        >>> krum(f=0)(trees, [1, 1, 1, 1])
        {'w': tensor([1.])}
        >>> krum(f=0, m=2)(trees, [1, 1, 1, 1])
        {'w': tensor([0.5000])}
    """
    return Krum(f, m)
