"""The executor protocol: a pluggable, order-preserving ``map`` over client tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

from .jobs import ClientContext

__all__ = ["ClosingContext", "Executor", "Preparing", "threads_of"]

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


def threads_of(executor: object) -> int:
    """The torch intra-op thread count ``executor`` runs client work with: its ``threads``.

    Every executor of this library has one (default 1); a user's executor without the
    attribute counts as 1. `blazefl_fn.round.run_round` runs the server's side of a round at
    the same count, so a round's bits depend on this number and not on the caller's
    ``torch.set_num_threads``.

    Raises:
        ValueError: ``executor.threads`` is not an integer >= 1.

    Examples:
        >>> from blazefl_fn.executors import Sequential
        >>> threads_of(Sequential()), threads_of(Sequential(threads=2)), threads_of(object())
        (1, 2, 1)
    """
    threads: object = getattr(executor, "threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"executor.threads must be an integer >= 1, got {threads!r}")
    return threads


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
