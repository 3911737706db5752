"""`Threads`: clients run in a thread pool of one process; data is shared by reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

from .._validators import check_int_at_least
from .base import ClosingContext

__all__ = ["Threads"]

T = TypeVar("T")
R = TypeVar("R")


class Threads(ClosingContext):
    """Maps tasks over ``workers`` threads; nothing is copied or serialized.

    Torch kernels release the GIL, so clients overlap on several cores; on free-threaded
    CPython the Python parts do too. Correctness does not rest on the GIL: each task gets only
    its own arguments, the library never writes into shared tensors, and results are collected
    in task order through futures.

    Args:
        workers: the number of threads (>= 1).

    Raises:
        ValueError: ``workers < 1``.

    Example:
        >>> with Threads(2) as ex:
        ...     ex.map(lambda x: x * x, [1, 2, 3])
        [1, 4, 9]
    """

    def __init__(self, workers: int) -> None:
        self.workers = check_int_at_least("workers", workers, 1)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="blazefl-fn"
        )

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``, run concurrently.

        If tasks fail, the first failure in task order is raised once every task already
        running has finished (tasks not yet started are cancelled), so no work outlives the
        call.

        Raises:
            RuntimeError: the executor is closed.
        """
        if self._pool is None:
            raise RuntimeError("this Threads executor is closed")
        futures: list[Future[R]] = [self._pool.submit(fn, task) for task in tasks]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            raise

    def close(self) -> None:
        """Stop the threads (waits for running tasks); idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"Threads({self.workers})"
