"""Per-round time of `Vectorized` against `Sequential` and `Threads` on one device.

Cases (FedAvg, every client sampled each round, 1 local epoch; inputs are random tensors of
the real shapes, drawn from a key: timing does not depend on pixel values):

- ``W1``: the small CNN on CIFAR-shaped inputs, 100 clients x 500, batch 50, lr 0.1;
- ``W0``: the small CNN, 1000 clients x 50, batch 50 (one local step), lr 0.1;
- ``mnist-mlp``: the 784-200-200-10 MLP on MNIST-shaped inputs, 100 clients x 600, batch 50;
- ``synthetic``: Synthetic(1,1) logistic regression, 1000 clients (sizes 50..1000, power-law),
  batch 10, lr 0.01.

Executors: ``sequential``, ``threads:2`` and ``vectorized`` with chunks of 10, 100 and all
clients, all on ``--device``. Each runs ``--rounds`` rounds in this process (the first is a
warm-up); the table gives the median of the later rounds, the speed-up over sequential and the
largest difference of the final parameters from sequential's. With ``--repeats 2`` every
configuration runs twice (interleaved) and the script also checks that vectorised runs repeat
bit for bit. It exits 1 when a repeat changed the bits.

    python -m benchmarks.vectorized --device cuda           # the GPU table (a few minutes)
    python -m benchmarks.vectorized --device cpu            # the CPU table (~15 min, 2 cores)
    python -m benchmarks.vectorized --tiny                  # seconds: the suite's smoke test
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import attrs
import torch

import blazefl_fn as fl
from blazefl_fn.data import ClientData, TensorDataset
from blazefl_fn.data.synthetic import synthetic
from blazefl_fn.executors.devices import check_device
from blazefl_fn.models import cnn, intra_op_threads, logistic_regression, mlp
from blazefl_fn.tree import Params

EXECUTORS = ("sequential", "threads:2", "vectorized:10", "vectorized:100", "vectorized:all")


@attrs.frozen
class Case:
    """One workload."""

    name: str
    model: Callable[[], torch.nn.Module]
    clients: Callable[[], Sequence[ClientData]]
    batch_size: int
    lr: float


@attrs.frozen
class Row:
    """One executor's run of a case."""

    case: str
    executor: str
    repeat: int
    round_seconds: float
    peak_mib: float | None
    params: Params
    digest: str


def _shaped(
    clients: int, samples: int, shape: tuple[int, ...], seed: str
) -> tuple[ClientData, ...]:
    generator = fl.Key.from_seed(0).fold_in(seed).torch_generator()
    n = clients * samples
    base = TensorDataset(
        torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )
    return tuple(
        ClientData(base, torch.arange(i * samples, (i + 1) * samples)) for i in range(clients)
    )


def cases(tiny: bool) -> list[Case]:
    """The four workloads; ``tiny`` shrinks them to seconds on a CPU."""
    scale = 10 if tiny else 1  # W0 shrinks by 50
    image = functools.partial(cnn, (3, 32, 32), 10)
    return [
        Case("W1", image, lambda: _shaped(100 // scale, 500 // scale, (3, 32, 32), "w1"), 50, 0.1),
        Case("W0", image, lambda: _shaped(1000 // scale // 5, 50, (3, 32, 32), "w0"), 50, 0.1),
        Case(
            "mnist-mlp",
            functools.partial(mlp, (1, 28, 28), 10),
            lambda: _shaped(100 // scale, 600 // scale, (1, 28, 28), "mnist"),
            50,
            0.1,
        ),
        Case(
            "synthetic",
            functools.partial(logistic_regression, (60,), 10),
            lambda: (
                synthetic(
                    1.0, 1.0, 1000 // scale, fl.Key.from_seed(0), max_samples=1000 // scale
                ).clients
            ),
            10,
            0.01,
        ),
    ]


def executor(spec: str, device: torch.device, clients: int) -> fl.Executor:
    """``sequential``, ``threads:W`` or ``vectorized:CHUNK|all`` on ``device``."""
    name, _, arg = spec.partition(":")
    if name == "sequential":
        return fl.Sequential(device)
    if name == "threads":
        return fl.Threads(int(arg), devices=[device])
    if name == "vectorized":
        return fl.Vectorized(None if arg == "all" else min(int(arg), clients), device=device)
    raise ValueError(f"unknown executor {spec!r}")


def run_case(case: Case, spec: str, device: torch.device, repeat: int, rounds: int) -> Row:
    """``rounds`` rounds of ``case`` with a fresh executor."""
    key = fl.Key.from_seed(0)
    clients = case.clients()
    algorithm = fl.fedavg(
        case.model,
        num_clients=len(clients),
        clients_per_round=len(clients),
        local=fl.LocalSGD(epochs=1, batch_size=case.batch_size, lr=case.lr),
    )
    state = algorithm.init(key.fold_in("init"))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with executor(spec, device, len(clients)) as ex:
        state, reports = fl.run_rounds(
            fl.make_round(algorithm, clients, ex), state, key, until=rounds
        )
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    later = [r.seconds for r in reports][1:] or [reports[0].seconds]
    return Row(
        case.name,
        spec,
        repeat,
        statistics.median(later),
        peak,
        state.params,
        fl.tree.digest(state.params),
    )


def _max_diff(a: Params, b: Params) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def print_table(rows: Sequence[Row]) -> bool:
    """The table; True when every configuration repeated its bits."""
    print("| case | executor | round s | vs sequential | max abs diff | peak MiB | digest |")
    print("|---|---|---:|---:|---:|---:|---|")
    ok = True
    for name in dict.fromkeys(r.case for r in rows):
        mine = [r for r in rows if r.case == name]
        reference = [r for r in mine if r.executor == "sequential"]
        base = statistics.median(r.round_seconds for r in reference) if reference else None
        for spec in dict.fromkeys(r.executor for r in mine):
            runs = [r for r in mine if r.executor == spec]
            seconds = statistics.median(r.round_seconds for r in runs)
            repeated = len({r.digest for r in runs}) == 1
            ok = ok and repeated
            ratio = f"{base / seconds:.2f}x" if base else "-"
            diff = f"{_max_diff(runs[0].params, reference[0].params):.2g}" if reference else "-"
            peak = "-" if runs[0].peak_mib is None else f"{runs[0].peak_mib:.0f}"
            mark = "" if repeated else " (NOT repeatable)"
            print(
                f"| {name} | {spec} | {seconds:.3f} | {ratio} | {diff} | {peak} "
                f"| {runs[0].digest[:12]}{mark} |"
            )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Vectorized against per-client executors.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (first: warm-up)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="seconds-sized cases (smoke test)")
    parser.add_argument("--cases", default="W1,W0,mnist-mlp,synthetic")
    parser.add_argument("--executors", default=",".join(EXECUTORS))
    args = parser.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as exc:
        print(f"vectorized: error: {exc}", file=sys.stderr)
        return 2
    chosen = [c for c in cases(args.tiny) if c.name in args.cases.split(",")]
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, intra-op threads 1"
    )
    rows: list[Row] = []
    with intra_op_threads(1):
        for case in chosen:
            for repeat in range(args.repeats):
                for spec in args.executors.split(","):
                    rows.append(run_case(case, spec, device, repeat, args.rounds))
                    print(f"  {case.name} {spec}: {rows[-1].round_seconds:.3f} s", file=sys.stderr)
    print()
    ok = print_table(rows)
    print(f"\nload {os.getloadavg()[0]:.2f}; vectorized: {'OK' if ok else 'FAILED'} "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
