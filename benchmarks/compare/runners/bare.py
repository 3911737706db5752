"""The physical floor: FedAvg in a bare PyTorch loop, no framework.

Modes:

- ``sequential``: one client after the other in this process (P = 1).
- ``threads``: a ``ThreadPoolExecutor`` of P threads; data and the global model shared by
  reference, one scratch model per thread.
- ``processes``: a spawn ``multiprocessing.Pool`` of P processes, created before the loop;
  the data set, the broadcast buffer and one result slot per client live in shared memory, so
  per round only ``(client id, round)`` goes down and ``(client id, examples, seconds)`` comes
  back.

Every mode times each client update; the median is the "one client's update time" from which
the report computes the ideal.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier as BarrierType

import torch

from tools.ft_check import gil_enabled

from ..common import FederatedArrays, client_seed, digest, load_arrays, load_init, train_client
from ..spec import Case, RunnerResult, Workload
from ._base import ModelCache, read_case

Spec = list[tuple[str, torch.Size]]


def _spec(params: dict[str, torch.Tensor]) -> Spec:
    return [(name, t.shape) for name, t in params.items()]


def _flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in params.values()])


def _unflatten(flat: torch.Tensor, spec: Spec) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in spec:
        numel = shape.numel()
        out[name] = flat[offset : offset + numel].view(shape)
        offset += numel
    return out


def _aggregate(flats: Sequence[torch.Tensor], weights: Sequence[int]) -> torch.Tensor:
    total = float(sum(weights))
    acc = torch.zeros(flats[0].shape, dtype=torch.float64)
    for flat, weight in zip(flats, weights, strict=True):
        acc.add_(flat.to(torch.float64), alpha=weight / total)
    return acc.to(torch.float32)


def _update(
    cache: ModelCache, work: Workload, data: FederatedArrays, flat: torch.Tensor, spec: Spec,
    cid: int, round_index: int,
) -> tuple[torch.Tensor, int, float]:  # fmt: skip
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(client_seed(work.seed, round_index, cid))
    params = train_client(
        cache.get(), _unflatten(flat, spec), data, cid, generator,
        epochs=work.epochs, batch_size=work.batch_size, lr=work.lr,
    )  # fmt: skip
    return _flatten(params), int(data.client(cid).shape[0]), time.perf_counter() - start


# -- process pool: the worker's state, set once by the pool initializer ---------------------


@dataclass
class _Worker:
    cache: ModelCache
    work: Workload
    data: FederatedArrays
    broadcast: torch.Tensor
    slots: torch.Tensor
    spec: Spec


_STATE: list[_Worker] = []


def _init_worker(
    threads: int, work: Workload, data: FederatedArrays, broadcast: torch.Tensor,
    slots: torch.Tensor, spec: Spec, ready: BarrierType,
) -> None:  # fmt: skip
    torch.set_num_threads(threads)
    _STATE.append(_Worker(ModelCache(work.model, work.classes), work, data, broadcast, slots, spec))
    ready.wait()  # the pool is started when every worker got here


def _process_task(task: tuple[int, int]) -> tuple[int, int, float]:
    cid, round_index = task
    w = _STATE[0]
    flat, n, seconds = _update(w.cache, w.work, w.data, w.broadcast, w.spec, cid, round_index)
    w.slots[cid].copy_(flat)
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
    slots = torch.empty(0)
    if case.mode == "threads":
        threads = ThreadPoolExecutor(case.parallelism)
    elif case.mode == "processes":
        for tensor in (data.x, data.y, data.indices):
            tensor.share_memory_()
        broadcast = flat.clone().share_memory_()
        slots = torch.empty(len(clients), flat.numel()).share_memory_()
        context = mp.get_context("spawn")
        ready = context.Barrier(case.parallelism + 1)
        pool = context.Pool(
            case.parallelism,
            initializer=_init_worker,
            initargs=(case.threads, work, data, broadcast, slots, spec, ready),
        )
        ready.wait()
        flat = broadcast
    elif case.mode != "sequential":
        raise SystemExit(f"bare: unknown mode {case.mode!r}")
    cache = ModelCache(work.model, work.classes)
    loop_start = time.time()
    start = time.perf_counter()
    for round_index in range(work.rounds):
        round_start = time.perf_counter()
        if pool is not None:
            replies = pool.map(_process_task, [(c, round_index) for c in clients], chunksize=1)
            flats = [slots[cid] for cid, _, _ in replies]
            weights = [n for _, n, _ in replies]
            client_times += [s for _, _, s in replies]
            flat.copy_(_aggregate(flats, weights))
        else:

            def one(
                cid: int, r: int = round_index, g: torch.Tensor = flat
            ) -> tuple[torch.Tensor, int, float]:
                return _update(cache, work, data, g, spec, cid, r)

            outs = list(threads.map(one, clients)) if threads else [one(c) for c in clients]
            client_times += [s for _, _, s in outs]
            flat = _aggregate([f for f, _, _ in outs], [n for _, n, _ in outs])
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
