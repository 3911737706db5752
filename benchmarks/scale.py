"""Federation size and run length: round time and memory with up to a million clients.

Three parts, each case in a fresh Python process so that its peak RSS is its own:

- ``synthetic``: FedAvg (logistic regression) on lazy Synthetic(1, 1) federations of
  ``--sizes`` clients, ``--per-round`` sampled per round for ``--rounds`` rounds, with
  ``Threads(2)`` and ``Processes(2)``: start-up seconds (data, init, pool start and sending
  the data once), the median round, the peak RSS of the driver and of the largest worker.
- ``stateful``: SCAFFOLD and SCARLET on MNIST with ``--stateful-clients`` clients (each a
  10-example view of the 50,000 examples left after a 10,000-example public set; views
  overlap, since there are more clients than examples), ``--per-round`` per round (SCARLET:
  ten times as many public samples per round, at most 1,000), ``--rounds`` rounds, the
  client-state store at its default budget (1 GiB, then spill files; ``--store-memory-mb``):
  peak RSS, the store's bytes in memory and on disk at the end.
- ``long``: the CLI's default job (``RunConfig()``: FedAvg on Synthetic(1, 1), 30 clients,
  10 per round) for ``--long-rounds`` rounds, sequential and on ``Processes(2)``: the RSS of
  the driver and of the largest worker at round 200 (a quarter of a shorter run), half-way
  and at the end.

    python -m benchmarks.scale --data-dir ~/data/mnist    # everything (blazefl-fn data mnist DIR)
    python -m benchmarks.scale --parts synthetic --sizes 1000,10000 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import blazefl_fn as fl
from blazefl_fn.algorithms.scaffold import scaffold
from blazefl_fn.algorithms.scarlet import scarlet
from blazefl_fn.data import ClientData, TensorDataset, synthetic
from blazefl_fn.data.mnist import load_mnist
from blazefl_fn.models import logistic_regression, mlp
from blazefl_fn.server.client_state import ClientStore

MiB = 2**20


def _rss(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A process's resident set (``VmRSS``) or peak (``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def _worker_peaks(field: str = "VmHWM") -> list[int]:
    """Peak (or, with ``field="VmRSS"``, current) RSS of this process's spawned workers."""
    peaks: list[int] = []
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            child = stat.rsplit(")", 1)[1].split()[1] == me
            if child and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
                peaks.append(_rss(entry.name, field))
        except (OSError, RuntimeError):
            continue
    return peaks


def _executor(name: str) -> fl.Executor:
    return fl.Threads(2) if name == "threads" else fl.Processes(2)


def _timed_rounds(
    round_fn: fl.RoundFn, state: fl.ServerState, rounds: int
) -> tuple[fl.ServerState, list[float]]:
    key = fl.Key.from_seed(1)
    times: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        state, _ = round_fn(state, key.fold_in(state.round))
        times.append(time.perf_counter() - start)
    return state, times


def case_synthetic(clients: int, executor_name: str, per_round: int, rounds: int) -> dict[str, Any]:
    """One lazy Synthetic(1, 1) case; see the module docstring."""
    start = time.perf_counter()
    data = synthetic(1.0, 1.0, clients, fl.Key.from_seed(0), lazy=True)
    algo = fl.fedavg(
        functools.partial(logistic_regression, (60,), 10),
        num_clients=clients,
        clients_per_round=per_round,
        local=fl.LocalSGD(epochs=1, batch_size=10, lr=0.01),
    )
    with _executor(executor_name) as executor:
        round_fn = fl.make_round(algo, data.clients, executor)
        state = algo.init(fl.Key.from_seed(2))
        startup = time.perf_counter() - start
        state, times = _timed_rounds(round_fn, state, rounds)
        workers = _worker_peaks()
    return {
        "clients": clients,
        "executor": executor_name,
        "startup_s": startup,
        "median_round_s": statistics.median(times),
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mib": max(workers) / MiB if workers else None,
        "digest": fl.tree.digest(state.params)[:12],
    }


class _Views(Sequence[ClientData]):
    """``n`` clients, client ``k`` the 10 rows ``(10k .. 10k+9) mod len(base)`` of ``base``."""

    def __init__(self, base: TensorDataset, n: int) -> None:
        self._base, self._n = base, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: Any) -> Any:
        if not isinstance(k, int) or not 0 <= k < self._n:
            raise IndexError(k)
        rows = (torch.arange(10) + 10 * k) % len(self._base)
        return ClientData(self._base, rows)


def case_stateful(
    algorithm: str, clients: int, data_dir: str, rounds: int, memory_mb: int | None, per_round: int
) -> dict[str, Any]:
    """SCAFFOLD or SCARLET on MNIST views; see the module docstring."""
    train, _test = load_mnist(data_dir)
    public, private = train.x[:10_000], TensorDataset(train.x[10_000:], train.y[10_000:])
    views = _Views(private, clients)
    model_fn = functools.partial(mlp, (1, 28, 28), 10)
    local = fl.LocalSGD(epochs=1, batch_size=10, lr=0.05)
    store = fl.StoreOptions() if memory_mb is None else fl.StoreOptions(memory_mb * MiB)
    if algorithm == "scaffold":
        algo: Any = scaffold(
            model_fn, num_clients=clients, clients_per_round=per_round, local=local, store=store
        )
    else:
        algo = scarlet(
            model_fn, public=public, num_classes=10, num_clients=clients,
            clients_per_round=per_round, local=local, public_per_round=min(1000, per_round * 10),
            store=store,
        )  # fmt: skip
    with fl.Threads(2) as executor:
        state, times = _timed_rounds(
            fl.make_round(algo, views, executor), algo.init(fl.Key.from_seed(2)), rounds
        )
    kept: ClientStore = state.aux.clients
    return {
        "algorithm": algorithm,
        "budget_mib": store.memory_bytes / MiB if store.memory_bytes is not None else None,
        "clients": clients,
        "median_round_s": statistics.median(times),
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stored_clients": kept.num_stored,
        "store_memory_mib": kept.memory_bytes / MiB,
        "store_spilled_mib": kept.spilled_bytes / MiB,
    }


class _Memory(fl.Callback):
    def __init__(self, marks: Sequence[int]) -> None:
        self.marks = set(marks)
        self.rss: dict[int, int] = {}
        self.workers: dict[int, int] = {}

    def on_round_end(self, event: fl.RoundEvent) -> None:
        if event.state.round in self.marks:
            self.rss[event.state.round] = _rss()
            self.workers[event.state.round] = max(_worker_peaks("VmRSS"), default=0)


def case_long(rounds: int, executor: str) -> dict[str, Any]:
    """The CLI's default job for ``rounds`` rounds; see the module docstring."""
    # The first reading comes after the start-up allocations have settled: round 200, or a
    # quarter of a shorter run.
    first = min(200, max(1, rounds // 4))
    marks = (first, rounds // 2, rounds)
    memory = _Memory(marks)
    start = time.perf_counter()
    config = fl.RunConfig(rounds=rounds, eval_every=rounds, executor=executor)
    fl.simulate(config, [memory])
    out: dict[str, Any] = {"executor": executor}
    out.update({f"driver_mib_{r}": memory.rss[r] / MiB for r in marks})
    out["driver_growth"] = memory.rss[rounds] / memory.rss[first] - 1
    if memory.workers[first]:
        out[f"worker_mib_{first}"] = memory.workers[first] / MiB
        out[f"worker_mib_{rounds}"] = memory.workers[rounds] / MiB
        out["worker_growth"] = memory.workers[rounds] / memory.workers[first] - 1
    out["seconds"] = time.perf_counter() - start
    return out


def _in_child(case: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--case", json.dumps(case)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    kind = case.pop("kind")
    if kind == "synthetic":
        return case_synthetic(**case)
    if kind == "stateful":
        return case_stateful(**case)
    return case_long(**case)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run the parts asked for, print their tables and return their rows by part."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="synthetic,stateful,long")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--executors", default="threads,processes")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--stateful-clients", type=int, default=100_000)
    parser.add_argument("--long-rounds", type=int, default=2000)
    parser.add_argument("--algorithms", default="scaffold,scarlet", help="of the stateful part")
    parser.add_argument(
        "--store-memory-mb",
        type=int,
        default=None,
        help="the stateful part's store budget in MiB (default: StoreOptions' 1 GiB)",
    )
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.long_rounds < 4:
        parser.error(f"--long-rounds must be at least 4 (three readings), got {args.long_rounds}")
    if args.case:
        print(json.dumps(_run_case(json.loads(args.case))))
        return {}
    parts = args.parts.split(",")
    results: dict[str, list[dict[str, Any]]] = {}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    if "synthetic" in parts:
        rows = [
            _in_child(
                {
                    "kind": "synthetic",
                    "clients": int(n),
                    "executor_name": ex,
                    "per_round": args.per_round,
                    "rounds": args.rounds,
                }
            )
            for ex in args.executors.split(",")
            for n in args.sizes.split(",")
        ]
        for row in rows:
            first = next(r for r in rows if r["executor"] == row["executor"])
            row["round_vs_smallest"] = row["median_round_s"] / first["median_round_s"]
        print(f"\nFedAvg on lazy Synthetic(1,1), {args.per_round} per round, {args.rounds} rounds")
        columns = ["clients", "executor", "startup_s", "median_round_s", "round_vs_smallest",
                   "driver_peak_mib", "worker_peak_mib", "digest"]  # fmt: skip
        print(_table(rows, columns))
        results["synthetic"] = rows
    if "stateful" in parts:
        rows = [
            _in_child(
                {
                    "kind": "stateful",
                    "algorithm": a,
                    "clients": args.stateful_clients,
                    "data_dir": args.data_dir,
                    "rounds": args.rounds,
                    "memory_mb": args.store_memory_mb,
                    "per_round": args.per_round,
                }
            )
            for a in args.algorithms.split(",")
        ]
        print(
            f"\nMNIST, {args.stateful_clients} clients, {args.per_round} per round, "
            f"{args.rounds} rounds"
        )
        columns = ["algorithm", "budget_mib", "clients", "median_round_s", "driver_peak_mib",
                   "stored_clients", "store_memory_mib", "store_spilled_mib"]  # fmt: skip
        print(_table(rows, columns))
        results["stateful"] = rows
    if "long" in parts:
        rows = [
            _in_child({"kind": "long", "rounds": args.long_rounds, "executor": ex})
            for ex in ("sequential", "processes")
        ]
        print(f"\nThe default job (RunConfig()), {args.long_rounds} rounds")
        print(_table(rows, list(dict.fromkeys(k for row in rows for k in row))))
        results["long"] = rows
    print(f"\nload {os.getloadavg()}")
    return results


if __name__ == "__main__":
    main()
