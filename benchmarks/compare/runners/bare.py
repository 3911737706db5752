"""The physical floor: FedAvg in a bare PyTorch loop, no framework.

Modes:

- ``sequential``: one client after the other in this process (P = 1).
- ``threads``: a ``ThreadPoolExecutor`` of P threads; data and the global model shared by
  reference, one scratch model per thread.
- ``processes``: a spawn ``multiprocessing.Pool`` of P processes, created before the loop;
  the data set, the broadcast buffer and one result row per client live in shared memory, so
  per round only ``(client id, round)`` goes down and ``(client id, examples, seconds)`` comes
  back, several clients to a message.

The fastest honest formulation of the work found (the floor is a lower bound): each scratch
model's parameters are views into one flat vector (each entry on a 64-byte boundary, as a tensor
of its own would be), so loading the broadcast is one ``copy_`` and the result is one ``copy_``
into the client's preallocated row; a step is
``p -= lr * grad`` in a plain loop (torch.optim.SGD's arithmetic without momentum: its
``step`` + ``zero_grad`` measured 369 us per step against 104 us); the average is a float64
weighted sum of the rows. Around one W0 step this costs ~0.3 ms per client against ~0.66 ms
for loading a state dict, stepping and cloning the state dict back (single thread, in-loop).

Every mode times each client update; the median is the "one client's update time" from which
the report computes the ideal.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier as BarrierType

import torch
from torch.nn import functional as F

from tools.ft_check import gil_enabled

from ..common import FederatedArrays, client_seed, digest, load_arrays, load_init
from ..spec import Case, RunnerResult, Workload
from ._base import ModelCache, read_case

Spec = list[tuple[str, torch.Size]]


def _spec(params: dict[str, torch.Tensor]) -> Spec:
    return [(name, t.shape) for name, t in params.items()]


# Each entry starts on a 64-byte boundary of the flat vector, as a tensor of its own would:
# packed end to end, most views were misaligned and one W0 client update took 7.7 ms against
# 7.1 ms (single thread, medians of 3 runs of 500 clients each).
_ALIGN = 16  # float32 elements


def _padded(shape: torch.Size) -> int:
    return -(-shape.numel() // _ALIGN) * _ALIGN


def _flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    flat = torch.zeros(sum(_padded(t.shape) for t in params.values()))
    for view, t in zip(_unflatten(flat, _spec(params)).values(), params.values(), strict=True):
        view.copy_(t)
    return flat


def _unflatten(flat: torch.Tensor, spec: Spec) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in spec:
        out[name] = flat[offset : offset + shape.numel()].view(shape)
        offset += _padded(shape)
    return out


def _aggregate(rows: torch.Tensor, weights: Sequence[int]) -> torch.Tensor:
    """The rows' weighted mean, summed in float64 row by row (on 2 cores this measured 47 ms
    for W0's 1000 rows; a float64 matrix-vector product in blocks, 230-290 ms)."""
    total = float(sum(weights))
    acc = torch.zeros(rows.shape[1], dtype=torch.float64)
    for row, weight in zip(rows, weights, strict=True):
        acc.add_(row.to(torch.float64), alpha=weight / total)
    return acc.to(torch.float32)


class _Flat:
    """One thread's scratch model whose parameters are views into one flat vector."""

    def __init__(self, cache: ModelCache, spec: Spec, lr: float) -> None:
        self.model = cache.get()
        named = dict(self.model.named_parameters())
        self.flat = torch.zeros(sum(_padded(shape) for _, shape in spec))
        for (name, shape), view in zip(spec, _unflatten(self.flat, spec).values(), strict=True):
            if named[name].shape != shape:
                raise SystemExit(f"bare: model parameter {name} is not {tuple(shape)}")
            named[name].data = view
        if len(named) != len(spec):
            raise SystemExit("bare: the model has state besides its parameters")
        self.parameters = list(named.values())
        self.lr = lr


class _FlatCache:
    """One `_Flat` per thread."""

    def __init__(self, work: Workload, spec: Spec) -> None:
        self._models = ModelCache(work.model, work.classes)
        self._spec = spec
        self._lr = work.lr
        self._local = threading.local()

    def get(self) -> _Flat:
        flat: _Flat | None = getattr(self._local, "flat", None)
        if flat is None:
            flat = _Flat(self._models, self._spec, self._lr)
            self._local.flat = flat
        return flat


def _update(
    cache: _FlatCache, work: Workload, data: FederatedArrays, broadcast: torch.Tensor,
    row: torch.Tensor, cid: int, round_index: int,
) -> tuple[int, float]:  # fmt: skip
    """Train client ``cid`` from ``broadcast`` into ``row``: its examples and seconds."""
    start = time.perf_counter()
    scratch = cache.get()
    generator = torch.Generator().manual_seed(client_seed(work.seed, round_index, cid))
    scratch.flat.copy_(broadcast)
    model = scratch.model
    model.train()
    indices = data.client(cid)
    for _ in range(work.epochs):
        order = indices[torch.randperm(indices.shape[0], generator=generator)]
        for first in range(0, order.shape[0], work.batch_size):
            rows = order[first : first + work.batch_size]
            loss = F.cross_entropy(model(data.x[rows]), data.y[rows])
            loss.backward()  # pyright: ignore[reportUnknownMemberType]
            with torch.no_grad():
                for p in scratch.parameters:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-scratch.lr)
                        p.grad = None
    row.copy_(scratch.flat)
    return int(indices.shape[0]), time.perf_counter() - start


# -- process pool: the worker's state, set once by the pool initializer ---------------------


@dataclass
class _Worker:
    cache: _FlatCache
    work: Workload
    data: FederatedArrays
    broadcast: torch.Tensor
    slots: torch.Tensor


_STATE: list[_Worker] = []


def _init_worker(
    threads: int, work: Workload, data: FederatedArrays, broadcast: torch.Tensor,
    slots: torch.Tensor, spec: Spec, ready: BarrierType,
) -> None:  # fmt: skip
    torch.set_num_threads(threads)
    _STATE.append(_Worker(_FlatCache(work, spec), work, data, broadcast, slots))
    _STATE[0].cache.get()  # the scratch model is made before the loop
    ready.wait()  # the pool is started when every worker got here


def _process_task(task: tuple[int, int]) -> tuple[int, int, float]:
    cid, round_index = task
    w = _STATE[0]
    n, seconds = _update(w.cache, w.work, w.data, w.broadcast, w.slots[cid], cid, round_index)
    return cid, n, seconds


def run(case: Case) -> RunnerResult:
    """Run the case's round loop; start-up (data, pool) happens before ``loop_start``."""
    work = case.workload
    torch.set_num_threads(case.threads)
    data = load_arrays(case.data_dir)
    init = load_init(case.data_dir)
    spec = _spec(init)
    flat = _flatten(init)
    clients = list(range(data.num_clients))
    client_times: list[float] = []
    round_times: list[float] = []
    pool = None
    threads: ThreadPoolExecutor | None = None
    rows = torch.empty(len(clients), flat.numel())
    if case.mode == "threads":
        threads = ThreadPoolExecutor(case.parallelism)
    elif case.mode == "processes":
        for tensor in (data.x, data.y, data.indices):
            tensor.share_memory_()
        broadcast = flat.clone().share_memory_()
        rows.share_memory_()
        context = mp.get_context("spawn")
        ready = context.Barrier(case.parallelism + 1)
        pool = context.Pool(
            case.parallelism,
            initializer=_init_worker,
            initargs=(case.threads, work, data, broadcast, rows, spec, ready),
        )
        ready.wait()
        flat = broadcast
    elif case.mode != "sequential":
        raise SystemExit(f"bare: unknown mode {case.mode!r}")
    cache = _FlatCache(work, spec)
    cache.get()  # the scratch model is made before the loop
    # Several clients to a message, as blazefl_fn's pools send them.
    chunk = max(1, min(32, len(clients) // (case.parallelism * 8)))
    loop_start = time.time()
    start = time.perf_counter()
    for round_index in range(work.rounds):
        round_start = time.perf_counter()
        if pool is not None:
            tasks = [(c, round_index) for c in clients]
            replies = pool.map(_process_task, tasks, chunksize=chunk)
            client_times += [s for _, _, s in replies]
            flat.copy_(_aggregate(rows, [n for _, n, _ in replies]))
        else:

            def one(cid: int, r: int = round_index, g: torch.Tensor = flat) -> tuple[int, float]:
                return _update(cache, work, data, g, rows[cid], cid, r)

            outs = list(threads.map(one, clients)) if threads else [one(c) for c in clients]
            client_times += [s for _, s in outs]
            flat = _aggregate(rows, [n for n, _ in outs])
        round_times.append(time.perf_counter() - round_start)
    loop_seconds = time.perf_counter() - start
    final = {name: t.clone() for name, t in _unflatten(flat, spec).items()}
    if pool is not None:
        pool.close()
        pool.join()
    if threads is not None:
        threads.shutdown()
    return RunnerResult(
        loop_start=loop_start,
        loop_seconds=loop_seconds,
        round_seconds=round_times,
        digest=digest(final),
        client_seconds=statistics.median(client_times),
        notes={"torch": torch.__version__, "gil": gil_enabled()},
    )


if __name__ == "__main__":
    run(read_case()).emit()
