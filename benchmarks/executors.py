"""Wall time per FedAvg round for each executor and worker count, on a CIFAR-10-shaped workload.

Default workload: 100 clients x 500 samples of 3x32x32 inputs with 10 classes (random tensors
from a key: timing does not depend on pixel values), the classic small CNN
(conv6-conv16-fc120-fc84), every client sampled each round, batch 50, 1 local epoch, lr 0.1,
torch intra-op threads 1 per client. Every configuration runs in this one process, one after
the other, so the ratios compare like with like on a noisy machine.

Reported per configuration: pool start-up, the first round (for processes it includes sending
the client data to the workers once), the median of the later rounds, the speed-up of that
median over sequential, and the digest of the final parameters (identical everywhere). Each
number is the median over ``--repeats`` passes through all configurations, interleaved.

    python -m benchmarks.executors                     # the default workload (~10 min, 2 cores)
    python -m benchmarks.executors --clients 10 --rounds 2 --configs sequential:1,threads:2
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Sequence

import attrs
import torch

import blazefl_fn as fl
from blazefl_fn.data import ClientData, TensorDataset
from blazefl_fn.models import cnn, intra_op_threads

DEFAULT_CONFIGS = "sequential:1,threads:1,threads:2,threads:3,processes:1,processes:2,processes:3"


@attrs.frozen
class Row:
    """One configuration's timings."""

    executor: str
    workers: int
    start_seconds: float
    first_round_seconds: float
    median_round_seconds: float
    digest: str


def cifar_shaped(clients: int, samples: int, key: fl.Key) -> tuple[ClientData, ...]:
    """``clients`` views of ``samples`` random 3x32x32 examples each, 10 classes."""
    generator = key.torch_generator()
    n = clients * samples
    base = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )
    order = torch.arange(n)
    return tuple(ClientData(base, order[i * samples : (i + 1) * samples]) for i in range(clients))


def make_executor(name: str, workers: int, threads: int) -> fl.Executor:
    if name == "sequential":
        return fl.Sequential()
    if name == "threads":
        return fl.Threads(workers)
    if name == "processes":
        return fl.Processes(workers, threads=threads)
    raise ValueError(f"unknown executor {name!r}")


def measure(
    name: str,
    workers: int,
    algorithm: fl.Algorithm[ClientData],
    clients: Sequence[ClientData],
    rounds: int,
    threads: int,
) -> Row:
    """Run ``rounds`` rounds on a fresh executor; time start-up and each round."""
    run_key = fl.Key.from_seed(0)
    state = algorithm.init(run_key.fold_in("init"))
    start = time.perf_counter()
    with make_executor(name, workers, threads) as executor:
        started = time.perf_counter() - start
        round_fn = fl.make_round(algorithm, clients, executor)
        state, reports = fl.run_rounds(round_fn, state, run_key, until=rounds)
    seconds = [r.seconds for r in reports]
    later = seconds[1:] or seconds
    return Row(
        executor=name,
        workers=workers,
        start_seconds=started,
        first_round_seconds=seconds[0],
        median_round_seconds=statistics.median(later),
        digest=fl.tree.digest(state.params),
    )


def print_table(rows: Sequence[Row], args: argparse.Namespace) -> None:
    """A markdown table; speed-ups are against the sequential row when there is one."""
    reference = next((r for r in rows if r.executor == "sequential"), None)
    print(
        f"FedAvg, {args.clients} clients x {args.samples} samples (3x32x32, 10 classes), cnn, "
        f"batch {args.batch_size}, {args.epochs} epoch(s), all clients per round, "
        f"{args.rounds} rounds, {args.threads} intra-op thread(s), medians over {args.repeats} "
        f"interleaved repeats; torch {torch.__version__}"
    )
    print()
    print(
        "| executor | workers | start s | round 1 s | median round s (2..) | vs sequential "
        "| params_sha256 |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        ratio = (
            f"{reference.median_round_seconds / row.median_round_seconds:.2f}x"
            if reference is not None
            else "-"
        )
        print(
            f"| {row.executor} | {row.workers} | {row.start_seconds:.2f} "
            f"| {row.first_round_seconds:.2f} | {row.median_round_seconds:.2f} | {ratio} "
            f"| {row.digest[:16]} |"
        )
    digests = {row.digest for row in rows}
    print()
    print("digests identical across configurations:", "yes" if len(digests) == 1 else "NO")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description="FedAvg round time per executor.")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500, help="examples per client")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="cycle through all configurations this many times (interleaved); report medians",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="executor:workers,...")
    args = parser.parse_args(argv)

    key = fl.Key.from_seed(0)
    clients = cifar_shaped(args.clients, args.samples, key.fold_in("data"))
    model_fn = functools.partial(cnn, (3, 32, 32), 10)
    algorithm = fl.fedavg(
        model_fn,
        num_clients=args.clients,
        clients_per_round=args.clients,
        local=fl.LocalSGD(epochs=args.epochs, batch_size=args.batch_size, lr=0.1),
    )
    configs = [
        (name, int(workers)) for name, workers in (c.split(":") for c in args.configs.split(","))
    ]
    runs: dict[tuple[str, int], list[Row]] = {config: [] for config in configs}
    with intra_op_threads(args.threads):
        # Interleaved, so that slow drift of a shared machine hits every configuration alike.
        for _ in range(args.repeats):
            for name, workers in configs:
                row = measure(name, workers, algorithm, clients, args.rounds, args.threads)
                runs[(name, workers)].append(row)
    rows = [_median_row(runs[config]) for config in configs]
    print_table(rows, args)
    return rows


def _median_row(rows: Sequence[Row]) -> Row:
    """Medians over repeats; the digest must be the same in every repeat."""
    digests = {row.digest for row in rows}
    return Row(
        executor=rows[0].executor,
        workers=rows[0].workers,
        start_seconds=statistics.median(r.start_seconds for r in rows),
        first_round_seconds=statistics.median(r.first_round_seconds for r in rows),
        median_round_seconds=statistics.median(r.median_round_seconds for r in rows),
        digest=rows[0].digest if len(digests) == 1 else "differs-between-repeats",
    )


if __name__ == "__main__":
    main()
