"""`Sequential`: the reference executor, a plain loop in the calling thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from .base import ClosingContext

__all__ = ["Sequential"]

T = TypeVar("T")
R = TypeVar("R")


class Sequential(ClosingContext):
    """Runs tasks one after another in the calling thread; the reference for every executor.

    Example:
        >>> with Sequential() as ex:
        ...     ex.map(lambda x: x * x, [1, 2, 3])
        [1, 4, 9]
    """

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``."""
        return [fn(task) for task in tasks]

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return "Sequential()"
