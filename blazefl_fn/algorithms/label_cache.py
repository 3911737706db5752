"""SCARLET's soft-label cache: one age rule, the per-index signals, and cache catch-up.

A cache holds, for every public index, a soft label and the round that produced it (``-1``:
never). One rule decides whether an entry can be used instead of asking the clients again,
on the server when it picks what to request and on a client when it checks what it was told:

    an entry produced in round ``p`` is fresh in round ``now`` iff
    ``0 <= p <= now and now - p < D``

with ``D`` the cache duration (``D = 0`` disables caching). An entry from a later round than
``now`` can only come from an inconsistent state and is never fresh.
"""

from __future__ import annotations

import enum

import attrs
import torch

__all__ = ["CacheSignal", "SoftLabelCache", "is_fresh"]


class CacheSignal(enum.IntEnum):
    """What the server tells clients about each public index whose label they distill on."""

    CACHED = 0
    """The label was fresh in the cache: it was not requested again and is not resent."""
    NEW = 1
    """The index had no label: it was requested, and its new label is now cached."""
    EXPIRED = 2
    """The cached label was too old: it was requested again and replaced."""


def is_fresh(produced: torch.Tensor, now: int, duration: int) -> torch.Tensor:
    """Which entries produced in rounds ``produced`` may be used in round ``now``.

    Examples:
        >>> import torch
        >>> is_fresh(torch.tensor([-1, 4, 5, 7]), now=7, duration=3)
        tensor([False, False,  True,  True])
    """
    return (produced >= 0) & (produced <= now) & (now - produced < duration)


@attrs.frozen(eq=False)
class SoftLabelCache:
    """Soft labels for a public set, with the round each was produced in (``-1``: none).

    Methods return new caches; the tensors of a cache are never written into.
    """

    labels: torch.Tensor
    produced: torch.Tensor

    @classmethod
    def empty(cls, size: int, num_classes: int) -> SoftLabelCache:
        """A cache of ``size`` public indices with no labels yet."""
        return cls(
            labels=torch.zeros(size, num_classes),
            produced=torch.full((size,), -1, dtype=torch.int64),
        )

    def fresh(self, indices: torch.Tensor, now: int, duration: int) -> torch.Tensor:
        """Which of ``indices`` hold a label that may be used in round ``now``."""
        return is_fresh(self.produced[indices], now, duration)

    def signals(self, indices: torch.Tensor, now: int, duration: int) -> torch.Tensor:
        """The `CacheSignal` (uint8) of each of ``indices`` in round ``now``, before `put`."""
        produced = self.produced[indices]
        signals = torch.full(
            produced.shape, int(CacheSignal.EXPIRED), dtype=torch.uint8, device=produced.device
        )
        signals[produced < 0] = int(CacheSignal.NEW)
        signals[is_fresh(produced, now, duration)] = int(CacheSignal.CACHED)
        return signals

    def put(self, indices: torch.Tensor, labels: torch.Tensor, now: int) -> SoftLabelCache:
        """A cache with ``labels`` stored at ``indices`` as produced in round ``now``."""
        produced = torch.full(indices.shape, now, dtype=torch.int64, device=indices.device)
        return self.apply(indices, labels, produced)

    def apply(
        self, indices: torch.Tensor, labels: torch.Tensor, produced: torch.Tensor
    ) -> SoftLabelCache:
        """A cache with the entries ``(labels, produced)`` written at ``indices``."""
        new_labels = self.labels.clone()
        new_produced = self.produced.clone()
        new_labels[indices] = labels.to(new_labels.dtype)
        new_produced[indices] = produced
        return SoftLabelCache(new_labels, new_produced)

    def stale(self, known: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Those of ``indices`` where a holder of entries produced in rounds ``known`` differs
        from this cache: what it must be sent to catch up."""
        return indices[known[indices] != self.produced[indices]]
