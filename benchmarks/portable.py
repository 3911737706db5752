"""W1 per-round time with portable numerics against native kernels, side by side.

Each mode runs in a fresh process (the pins act only before torch's first kernel): W1 is the
small CNN on CIFAR-shaped inputs, 100 clients x 500, batch 50, 1 epoch, lr 0.1, every client
each round, intra-op threads 1. The table gives the median of the rounds after the first, the
slowdown of portable against native, the ATen capability in use and the digest.

    python -m benchmarks.portable                      # W1, sequential (~3 min on 2 cores)
    python -m benchmarks.portable --clients 10 --samples 50 --rounds 2   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any


def child(args: argparse.Namespace) -> None:
    """One run in this (fresh) process; prints one JSON line."""
    from blazefl_fn import portable

    if args.mode == "portable":
        portable.enable()
    import blazefl_fn as fl
    from benchmarks.executors import cifar_shaped, make_executor
    from blazefl_fn.models import cnn, intra_op_threads

    key = fl.Key.from_seed(0)
    clients = cifar_shaped(args.clients, args.samples, key.fold_in("data"))
    algorithm = fl.fedavg(
        lambda: cnn((3, 32, 32), 10),
        num_clients=args.clients,
        clients_per_round=args.clients,
        local=fl.LocalSGD(epochs=1, batch_size=50, lr=0.1),
    )
    name, _, workers = args.executor.partition(":")
    with intra_op_threads(1), make_executor(name, int(workers or 1), 1) as ex:
        state = algorithm.init(key.fold_in("init"))
        state, reports = fl.run_rounds(
            fl.make_round(algorithm, clients, ex), state, key, until=args.rounds
        )
    later = [r.seconds for r in reports][1:] or [reports[0].seconds]
    print(json.dumps({
        "mode": args.mode, "executor": args.executor, "seconds": statistics.median(later),
        "capability": portable.cpu_capability(), "digest": fl.tree.digest(state.params),
    }))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Portable numerics against native, on W1.")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--executors", default="sequential", help="e.g. sequential,threads:2")
    parser.add_argument("--mode", choices=("native", "portable"), help=argparse.SUPPRESS)
    parser.add_argument("--executor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode is not None:
        child(args)
        return 0
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; W1 with {args.clients} "
          f"clients x {args.samples}, {args.rounds} rounds")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for executor in args.executors.split(","):
        for mode in ("native", "portable"):
            flags = ["--mode", mode, "--executor", executor, "--clients", str(args.clients),
                     "--samples", str(args.samples), "--rounds", str(args.rounds)]  # fmt: skip
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.portable", *flags],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                print(f"portable: the {mode} run failed:\n{done.stderr}", file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("\n| executor | mode | ATen capability | round s | vs native | digest |")
    print("|---|---|---|---:|---:|---|")
    for row in rows:
        native = next(r for r in rows if r["executor"] == row["executor"] and r["mode"] == "native")
        ratio = row["seconds"] / native["seconds"]
        print(f"| {row['executor']} | {row['mode']} | {row['capability']} "
              f"| {row['seconds']:.3f} | {ratio:.2f}x | {row['digest'][:12]} |")  # fmt: skip
    print(f"\nload {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
