"""`Sequential`: the reference executor, a plain loop in the calling thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from ._placement import InProcess, placed
from .devices import DeviceLike, check_device, check_devices

__all__ = ["Sequential"]

T = TypeVar("T")
R = TypeVar("R")


class Sequential(InProcess):
    """Runs tasks one after another in the calling thread; the reference for every executor.

    Args:
        device: where clients train (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        devices: several devices instead; client ``k`` trains on ``devices[k % len(devices)]``,
            as on every executor, so the bits match `Threads` and `Processes` given the same
            list. Give ``device`` or ``devices``, not both.
        threads: torch's intra-op threads for client work (>= 1; default 1, as on every
            executor). The bits depend on it: every executor given the same count computes
            the same bits, whatever the caller's ``torch.set_num_threads``.

    Each client's data is moved to its device once, the broadcast once per round and device;
    uplinks come back to the device of the server's parameters. On CUDA, client work runs
    with deterministic kernels (`blazefl_fn.executors.devices.cuda_determinism`).

    Raises:
        ValueError: a device that does not exist here, or both arguments.

    Examples:
        >>> with Sequential() as ex:
        ...     ex.map(lambda x: x * x, [1, 2, 3])
        [1, 4, 9]
    """

    def __init__(
        self,
        device: DeviceLike | None = None,
        *,
        devices: Sequence[DeviceLike] | None = None,
        threads: int = 1,
    ) -> None:
        if device is not None and devices is not None:
            raise ValueError("give device or devices, not both")
        if devices is not None:
            self.devices: tuple[torch.device, ...] = check_devices(devices)
        else:
            self.devices = (check_device("cpu" if device is None else device),)
        super().__init__(self.devices, threads)

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``."""
        run = placed(self._placement, fn)
        with self._pinned():
            return [run(task) for task in tasks]

    def __repr__(self) -> str:
        args = (
            []
            if self.devices == (torch.device("cpu"),)
            else [f"devices={[str(d) for d in self.devices]}"]
        )
        args += [] if self.threads == 1 else [f"threads={self.threads}"]
        return f"Sequential({', '.join(args)})"
