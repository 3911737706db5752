"""The executor protocol: a pluggable, order-preserving ``map`` over client tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

from ..jobs import ClientContext

__all__ = ["ClosingContext", "Executor", "Preparing"]

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn`` over ``tasks`` and returns the results in task order.

    Implementations may run tasks in any order and in parallel, but must return
    ``[fn(t) for t in tasks]`` exactly, and must re-raise the first failing task's exception
    (by task order). Executors are context managers; ``close`` releases their workers.
    """

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``, however it is scheduled."""
        ...

    def close(self) -> None:
        """Release workers and any other resources; idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class Preparing(Protocol):
    """An executor that can take a run's static client context ahead of its first map."""

    def prepare(self, context: ClientContext[Any]) -> None:
        """Make ``context`` ready in the workers (e.g. send it once, into shared memory)."""
        ...


class ClosingContext:
    """Mixin: ``with executor:`` calls ``executor.close()`` on the way out."""

    def close(self) -> None:
        """Release resources; subclasses override."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
