"""Where one W0 round's time goes, phase by phase: blazefl_fn against the bare loop of its kind.

    python -m benchmarks.round_phases                        # 1000 clients, 3 repeats (~2 min)
    python -m benchmarks.round_phases --clients 200 --repeats 2 --modes threads

W0's shape: CIFAR-shaped clients of 50 examples, the small CNN, one local step of batch 50, one
round. blazefl_fn runs `fedavg` through `make_round` on `Threads(workers)` or `Sequential()`;
the floor is `benchmarks.compare`'s bare loop (parameters as views of one flat vector, results
written into preallocated rows, the row-by-row float64 average) on a ``ThreadPoolExecutor`` of
as many threads, or in a plain loop. Both start from the same parameters on the same data.

Each run is one round in a fresh interpreter, and the runs are interleaved (bare, blazefl_fn,
bare, ...). The same timer wraps both client updates and records, per client, its wall time,
its thread's CPU time and its thread's minor page faults (Linux ``RUSAGE_THREAD``). The round
splits into:

- head: from the round's start to the first client's start (sampling, keys, tasks, submits);
- map: from the first client's start to the last client's end;
- tail: from the last client's end to the round's end (blazefl_fn: the non-finite screen, the
  aggregate and the report; bare: the average);
- gap: on each thread, the time between one client's end and its next client's start (what
  the executor and blazefl_fn's `ClientJob` cost a task besides the update).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import torch

import blazefl_fn as fl

from .compare.common import FederatedArrays
from .compare.runners import bare
from .compare.spec import Workload
from .overhead import EXAMPLES, w0_clients, w0_fedavg, w0_tensors

__all__ = ["main"]

MODES = ("threads", "sequential")
_ROOT = Path(__file__).resolve().parents[1]
_FAULTS = getattr(resource, "RUSAGE_THREAD", None)  # Linux only


class _Timer:
    """Per client: start, end, thread CPU seconds, minor faults and the thread it ran on."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float, float, int, int]] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            faults = resource.getrusage(_FAULTS).ru_minflt if _FAULTS is not None else 0
            cpu = time.thread_time()
            start = time.perf_counter()
            out = fn(*args)
            end = time.perf_counter()
            cpu = time.thread_time() - cpu
            if _FAULTS is not None:
                faults = resource.getrusage(_FAULTS).ru_minflt - faults
            self.spans.append((start, end, cpu, faults, threading.get_ident()))
            return out

        return timed


def _data(clients: int) -> tuple[torch.Tensor, torch.Tensor, fl.tree.Params]:
    x, y = w0_tensors(clients)
    return x, y, w0_fedavg(clients).init(fl.Key.from_seed(1)).params


def _fn_round(timer: _Timer, clients: int, workers: int, mode: str) -> tuple[float, float, str]:
    x, y, params = _data(clients)
    data = w0_clients(x, y)
    algorithm = w0_fedavg(clients)
    algorithm = attrs.evolve(algorithm, client_update=timer.wrap(algorithm.client_update))
    executor = fl.Threads(workers) if mode == "threads" else fl.Sequential()
    with executor:
        round_fn = fl.make_round(algorithm, data, executor)
        start = time.perf_counter()
        state, _ = round_fn(fl.ServerState(params=params), fl.Key.from_seed(2))
        end = time.perf_counter()
    return start, end, fl.tree.digest(state.params)[:12]


def _bare_round(timer: _Timer, clients: int, workers: int, mode: str) -> tuple[float, float, str]:
    x, y, params = _data(clients)
    arrays = FederatedArrays(
        x, y, torch.arange(clients * EXAMPLES), [i * EXAMPLES for i in range(clients + 1)]
    )
    work = Workload("W0", "cnn", clients, EXAMPLES, 1, EXAMPLES, 0.1, rounds=1)
    spec = bare._spec(dict(params))  # pyright: ignore[reportPrivateUsage]
    flat = bare._flatten(dict(params))  # pyright: ignore[reportPrivateUsage]
    rows = torch.empty(clients, flat.numel())
    cache = bare._FlatCache(work, spec)  # pyright: ignore[reportPrivateUsage]
    cache.get()
    update = timer.wrap(bare._update)  # pyright: ignore[reportPrivateUsage]

    def one(cid: int) -> tuple[int, float]:
        return update(cache, work, arrays, flat, rows[cid], cid, 0)

    pool = ThreadPoolExecutor(workers) if mode == "threads" else None
    try:
        start = time.perf_counter()
        outs = list(pool.map(one, range(clients))) if pool else [one(c) for c in range(clients)]
        average = bare._aggregate(rows, [n for n, _ in outs])  # pyright: ignore[reportPrivateUsage]
        end = time.perf_counter()
    finally:
        if pool is not None:
            pool.shutdown()
    return start, end, fl.tree.digest({"flat": average})[:12]


def _case(framework: str, mode: str, clients: int, workers: int) -> dict[str, Any]:
    """One round of ``framework`` (``bare`` or ``blazefl_fn``) in this process, by phase."""
    torch.set_num_threads(1)
    timer = _Timer()
    run = _fn_round if framework == "blazefl_fn" else _bare_round
    start, end, digest = run(timer, clients, workers, mode)
    spans = timer.spans
    first = min(s[0] for s in spans)
    last = max(s[1] for s in spans)
    by_thread: dict[int, list[tuple[float, float]]] = {}
    for s in spans:
        by_thread.setdefault(s[4], []).append((s[0], s[1]))
    ordered = [sorted(runs) for runs in by_thread.values()]
    gaps = [b[0] - a[1] for runs in ordered for a, b in itertools.pairwise(runs)]
    return {
        "framework": framework,
        "mode": mode,
        "round_s": end - start,
        "head_ms": 1e3 * (first - start),
        "map_s": last - first,
        "tail_ms": 1e3 * (end - last),
        "update_us": 1e6 * statistics.mean(s[1] - s[0] for s in spans),
        "cpu_us": 1e6 * statistics.mean(s[2] for s in spans),
        "faults": statistics.mean(s[3] for s in spans) if _FAULTS is not None else float("nan"),
        "gap_us": 1e6 * statistics.mean(gaps) if gaps else 0.0,
        "digest": digest,
    }


def _spawn(framework: str, mode: str, clients: int, workers: int) -> dict[str, Any]:
    """`_case` in a fresh interpreter (so no run inherits another's heap)."""
    argv = ["--case", f"{framework}:{mode}", "--clients", str(clients), "--workers", str(workers)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.round_phases", *argv],
        cwd=_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"round_phases: the {framework}:{mode} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_COLUMNS = ("round_s", "head_ms", "map_s", "tail_ms", "update_us", "cpu_us", "faults", "gap_us")


def _table(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> list[str]:
    lines = [
        "| run | round s | head ms | map s | tail ms | update µs (wall) | update µs (CPU) "
        "| minor faults | gap µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for mode in modes:
        for framework in ("bare", "blazefl_fn"):
            mine = [r for r in rows if r["mode"] == mode and r["framework"] == framework]
            med = {c: statistics.median(r[c] for r in mine) for c in _COLUMNS}
            medians[framework, mode] = med
            digests = sorted({r["digest"] for r in mine})
            lines.append(
                f"| {framework}:{mode} | {med['round_s']:.3f} | {med['head_ms']:.1f} | "
                f"{med['map_s']:.3f} | {med['tail_ms']:.1f} | {med['update_us']:.0f} | "
                f"{med['cpu_us']:.0f} | {med['faults']:.0f} | {med['gap_us']:.0f} |"
                + ("" if len(digests) == 1 else f" digests differ: {digests}")
            )
    lines.append("")
    for mode in modes:
        fn, floor = medians["blazefl_fn", mode], medians["bare", mode]
        lines.append(
            f"{mode}: blazefl_fn / bare {fn['round_s'] / floor['round_s']:.3f}x; of the "
            f"{1e3 * (fn['round_s'] - floor['round_s']):.0f} ms difference, map "
            f"{1e3 * (fn['map_s'] - floor['map_s']):.0f} ms, tail "
            f"{fn['tail_ms'] - floor['tail_ms']:.0f} ms, head "
            f"{fn['head_ms'] - floor['head_ms']:.0f} ms"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.round_phases", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="threads of both pools")
    parser.add_argument("--modes", default="threads,sequential", help="threads, sequential")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(argv)
    for name in ("clients", "repeats", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES)) or ([] if modes else [args.modes])
    if unknown:
        parser.error(f"--modes takes {', '.join(MODES)}; got {', '.join(map(repr, unknown))}")
    if args.case is not None:
        framework, _, mode = args.case.partition(":")
        print(json.dumps(_case(framework, mode, args.clients, args.workers)))
        return 0
    load = os.getloadavg()[0]
    rows = [
        _spawn(framework, mode, args.clients, args.workers)
        for _ in range(args.repeats)
        for mode in modes
        for framework in ("bare", "blazefl_fn")
    ]
    print(f"W0 shape, {args.clients} clients, {args.workers} threads, medians of "
          f"{args.repeats} fresh processes each; load average {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after\n")  # fmt: skip
    print("\n".join(_table(rows, modes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
