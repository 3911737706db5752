"""`Vectorized`: trains a chunk of clients in one `torch.func` step; a GPU feature."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence, Sized
from typing import Any, TypeVar, cast

import attrs
import torch

from .._validators import check_int_at_least
from ..errors import ChunkError, ClientError, PerClientFallback
from ..records import ClientTask, Uplink
from ._placement import InProcess, placed, server_device, uplink_on
from .devices import DeviceLike, check_device, to_device
from .jobs import ClientJob, VectorizedUpdate, global_rng_guard

__all__ = [
    "Vectorized",
]

T = TypeVar("T")
R = TypeVar("R")

_CPU = torch.device("cpu")


class Vectorized(InProcess):
    """Trains ``chunk`` clients at once: stacked parameters, one vectorised step for all.

    For a client update that is a `blazefl_fn.executors.jobs.VectorizedUpdate` (the LocalSGD family:
    FedAvg, FedProx, FedAvgM, FedAdam/Yogi/Adagrad, the robust aggregators) each chunk of
    sampled clients, in client order, trains together: ``torch.func.vmap`` of the forward
    pass over the stacked parameters, then one backward pass, each client on its own batches
    from its own key. Any other client update
    (DS-FL, SCARLET, user code) runs one client at a time, with a `PerClientFallback` warning
    the first time. Aggregation is unchanged.

    A small model's step is a few hundred tiny kernels, so on a GPU one client at a time
    leaves the device idle; stacking clients is the way past that. **On the CPU it is slower**
    than the per-client executors (stacked weights fall out of cache, batched convolutions are
    slow): use it on a GPU.

    Results equal the per-client executors' up to float rounding, not bit for bit; for a
    given device and chunk size they are bitwise reproducible. A different chunk size may
    change the last bits (a batched kernel may sum in another order).

    Args:
        chunk: clients per vectorised step; None trains every sampled client in one chunk
            (or as many as ``max_bytes`` allows).
        device: where clients train; the data moves there once, the broadcast once per round.
        max_bytes: a memory budget for one chunk; the chunk size is derived from it (about
            `VectorizedUpdate.client_bytes` per client), and a ``chunk`` that does not fit is
            refused before training starts.
        threads: torch's intra-op threads while it trains (>= 1; default 1, as on every
            executor).

    Raises:
        ValueError: ``chunk``, ``max_bytes`` or ``threads`` below 1, a device that does not
            exist here;
            from `map`: a model that cannot be vectorised (dropout, BatchNorm), a chunk over
            ``max_bytes`` or over the GPU's free memory.

    Examples:
        >>> with Vectorized(chunk=4) as ex:
        ...     ex.map(lambda x: x * x, [1, 2, 3])
        [1, 4, 9]
    """

    def __init__(
        self,
        chunk: int | None = None,
        *,
        device: DeviceLike = "cpu",
        max_bytes: int | None = None,
        threads: int = 1,
    ) -> None:
        self.chunk = None if chunk is None else check_int_at_least("chunk", chunk, 1)
        self.max_bytes = (
            None if max_bytes is None else check_int_at_least("max_bytes", max_bytes, 1)
        )
        self.device = check_device(device)
        self._warned: set[type] = set()
        super().__init__((self.device,), threads)

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``; a vectorisable client job runs chunk by chunk.

        Raises:
            ClientError: a client (run alone) failed; a `ChunkError` names a failed chunk.
            ValueError: the model cannot be vectorised, or a chunk does not fit in memory.
        """
        with self._pinned():
            target = cast(object, fn)
            if isinstance(target, ClientJob) and all(isinstance(t, ClientTask) for t in tasks):
                job = cast(ClientJob[Any], target)
                update = cast(object, job.context.client_update)
                if isinstance(update, VectorizedUpdate):
                    chunked = self._run_chunks(job, cast(Sequence[ClientTask], tasks))
                    return cast(list[R], chunked)
                self._warn_once(type(update))
            run = placed(self._placement, fn)
            return [run(task) for task in tasks]

    def chunk_size(self, per_client: int, tasks: int) -> int:
        """The clients per chunk for a map of ``tasks`` clients of ``per_client`` bytes each.

        Raises:
            ValueError: one client, or the requested chunk, exceeds ``max_bytes`` (or the
                GPU's free memory).
        """
        size = min(self.chunk or tasks, tasks) or 1  # a chunk never exceeds the map
        budget = self.max_bytes
        if budget is not None and self.chunk is None:
            if per_client > budget:
                raise ValueError(
                    f"one client needs about {per_client} bytes, over max_bytes={budget}"
                )
            size = min(size, budget // per_client)
        need = size * per_client
        if budget is not None and need > budget:
            raise ValueError(
                f"chunk={size} needs about {need} bytes, over max_bytes={budget}; "
                f"use chunk <= {max(budget // per_client, 1)} or a larger max_bytes"
            )
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # What torch's caching allocator holds but does not use is free for this chunk
            # (after round 1 the cache holds the previous chunk's peak).
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
                self.device
            )
            if need > free:
                raise ValueError(
                    f"a chunk of {size} clients needs about {need} bytes but {self.device} has "
                    f"{free} bytes free; pass a smaller chunk or max_bytes"
                )
        return size

    def _run_chunks(self, job: ClientJob[Any], tasks: Sequence[ClientTask]) -> list[Uplink]:
        if not tasks:
            return []
        server = server_device(job)
        on_cpu = self.device == server == _CPU
        # On the plain CPU nothing moves (clients keep sharing their base dataset).
        context = job.context if on_cpu else self._placement.context(job.context, 0)
        update = cast(VectorizedUpdate[Any], context.client_update)
        downlink = to_device(job.downlink, self.device)
        first = tasks[0]
        try:
            clients = [context.clients[t.client_id] for t in tasks]
        except Exception as exc:
            raise ClientError(first.client_id, first.round, exc) from exc
        largest = max(clients, key=_size)
        try:
            per_client = update.client_bytes(downlink, largest)
        except ValueError:
            raise  # a model that cannot be vectorised: the caller's error, said as it is
        except Exception as exc:
            raise ChunkError([t.client_id for t in tasks], first.round, exc) from exc
        size = self.chunk_size(per_client, len(tasks))
        uplinks: list[Uplink] = []
        for start in range(0, len(tasks), size):
            part = [self._on_device(t) for t in tasks[start : start + size]]
            ids = [t.client_id for t in part]
            try:
                with global_rng_guard(context.check_global_rng, self.device):
                    out = update.update_chunk(downlink, clients[start : start + size], part)
                if [u.client_id for u in out] != ids:
                    raise ValueError(
                        f"update_chunk returned uplinks for {[u.client_id for u in out]}"
                    )
            except torch.cuda.OutOfMemoryError as exc:
                raise ChunkError(ids, first.round, _out_of_memory(exc, len(part))) from exc
            except Exception as exc:
                raise ChunkError(ids, first.round, exc) from exc
            uplinks += out if server == self.device else [uplink_on(u, server) for u in out]
        return uplinks

    def _on_device(self, task: ClientTask) -> ClientTask:
        return attrs.evolve(
            task,
            message=to_device(task.message, self.device),
            state=to_device(task.state, self.device),
            device=self.device,
        )

    def _warn_once(self, kind: type) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(
            f"Vectorized runs {kind.__qualname__} one client at a time: it is not a "
            "VectorizedUpdate (only the LocalSGD family trains in chunks)",
            PerClientFallback,
            stacklevel=3,
        )

    def __repr__(self) -> str:
        threads = "" if self.threads == 1 else f", threads={self.threads}"
        return f"Vectorized(chunk={self.chunk}, device={str(self.device)!r}{threads})"


def _size(data: object) -> int:
    # The largest client bounds the estimate; data without a length counts as one.
    return len(data) if isinstance(data, Sized) else 1


def _out_of_memory(exc: BaseException, size: int) -> ValueError:
    return ValueError(
        f"out of GPU memory training a chunk of {size} clients ({exc}); pass a smaller chunk "
        "or max_bytes"
    )
