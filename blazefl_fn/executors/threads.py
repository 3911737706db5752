"""`Threads`: clients run in a thread pool of one process; data is shared by reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from .._validators import check_int_at_least
from ._placement import InProcess, placed
from .devices import DeviceLike, check_devices

__all__ = ["Threads"]

T = TypeVar("T")
R = TypeVar("R")


class Threads(InProcess):
    """Maps tasks over ``workers`` threads; nothing is copied or serialized.

    Torch kernels release the GIL, so clients overlap on several cores; on free-threaded
    CPython the Python parts do too. Correctness does not rest on the GIL: each task gets only
    its own arguments, the library never writes into shared tensors, results are collected
    in task order through futures, and what is placed on devices is placed under a lock.
    ``make test-ft`` checks this on CPython 3.13t with the GIL off (the guide's
    "Free-threaded Python").

    Args:
        workers: the number of threads (>= 1).
        devices: where clients train; client ``k`` on ``devices[k % len(devices)]``, whichever
            thread runs it (default: the CPU). Each client's data moves to its device once,
            the broadcast once per round and device; uplinks come back to the device of the
            server's parameters.
        threads: torch's intra-op threads for client work (>= 1; default 1, as on every
            executor). It is set for the whole map and the caller's is restored afterwards;
            each pool thread takes it at its first parallel operation (torch reads it once per
            thread), so one pool keeps one count.

    Raises:
        ValueError: ``workers < 1``, ``threads < 1`` or a device that does not exist here.

    Examples:
        >>> with Threads(2) as ex:
        ...     ex.map(lambda x: x * x, [1, 2, 3])
        [1, 4, 9]
    """

    def __init__(
        self, workers: int, *, devices: Sequence[DeviceLike] = ("cpu",), threads: int = 1
    ) -> None:
        self.workers = check_int_at_least("workers", workers, 1)
        self.devices = check_devices(devices)
        super().__init__(self.devices, threads)
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
        run = placed(self._placement, fn)
        # Process-wide switches: held by the calling thread while every task runs.
        with self._pinned():
            futures: list[Future[R]] = [self._pool.submit(run, task) for task in tasks]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                wait(futures)
                raise

    def close(self) -> None:
        """Stop the threads (waits for running tasks) and release placed data; idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        super().close()

    def __repr__(self) -> str:
        args = [str(self.workers)]
        if self.devices != (torch.device("cpu"),):
            args.append(f"devices={[str(d) for d in self.devices]}")
        if self.threads != 1:
            args.append(f"threads={self.threads}")
        return f"Threads({', '.join(args)})"
