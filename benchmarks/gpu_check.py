"""The GPU check: per-round time, GPU memory and one digest per case on every executor.

Cases (CIFAR-shaped random tensors from a key; FedAvg, every client each round, batch 50,
1 local epoch, lr 0.1):

- ``W1``: 100 clients x 500 samples, the small CNN, 3 rounds;
- ``resnet18``: 20 clients x 500 samples, CIFAR ResNet-18, 2 rounds.

Each case runs on ``--device`` with Sequential, Threads(2), Threads(4) and Processes(2),
``--repeats`` times (interleaved), then once on the CPU (Threads over half the cores, one round)
for comparison. Afterwards every shipped algorithm runs a few tiny rounds on ``--device`` with
Sequential, Threads(2) and Processes(2) and with the server's model on the device too. Last,
`benchmarks.vectorized` times `Vectorized` against Sequential and Threads on the device (W1,
W0, the MNIST MLP, Synthetic(1,1); chunks 10, 100, all), each run twice. The script prints
tables and exits 1 if any case or algorithm gave more than one digest on the device, an
in-process executor did not give its GPU memory back, or a vectorised run did not repeat
its bits.

    python -m benchmarks.gpu_check                       # on cuda: under 5 minutes on one GPU
    python -m benchmarks.gpu_check --device cpu --tiny   # the smoke test the suite runs
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
from benchmarks import vectorized
from benchmarks.compare.models import resnet18
from benchmarks.executors import cifar_shaped
from blazefl_fn.data import ClientData, FederatedDataset, TensorDataset
from blazefl_fn.executors.devices import check_device
from blazefl_fn.models import cnn, intra_op_threads
from blazefl_fn.run.config import ALGORITHMS, RunConfig
from blazefl_fn.run.simulate import make_algorithm

EXECUTORS = ("sequential:1", "threads:2", "threads:4", "processes:2")
MiB = 2**20


@attrs.frozen
class Case:
    """One workload."""

    name: str
    model: Callable[[], torch.nn.Module]
    clients: int
    samples: int
    rounds: int


@attrs.frozen
class Row:
    """One executor's run of a case."""

    case: str
    executor: str
    repeat: int
    round_seconds: float
    peak_mib: float | None  # allocated by this process (None on the CPU or in workers)
    device_used_mib: float | None  # the whole device, after the rounds (None on the CPU)
    released: bool | None  # in-process memory back to its start after close
    digest: str


def cases(tiny: bool) -> list[Case]:
    """W1 and the ResNet-18 case; ``tiny`` shrinks both to seconds on a CPU."""
    small = functools.partial(cnn, (3, 32, 32), 10)
    if tiny:
        return [Case("W1", small, 4, 20, 2), Case("resnet18", resnet18, 2, 4, 1)]
    return [Case("W1", small, 100, 500, 3), Case("resnet18", resnet18, 20, 500, 2)]


def executor(spec: str, device: torch.device) -> fl.Executor:
    """``name:workers`` on ``device``."""
    name, workers = spec.split(":")
    devices = [device]
    if name == "sequential":
        return fl.Sequential(device)
    if name == "threads":
        return fl.Threads(int(workers), devices=devices)
    return fl.Processes(int(workers), devices=devices)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_case(case: Case, spec: str, device: torch.device, repeat: int, rounds: int) -> Row:
    """``rounds`` rounds of ``case`` on a fresh executor."""
    key = fl.Key.from_seed(0)
    clients = cifar_shaped(case.clients, case.samples, key.fold_in("data"))
    algorithm = fl.fedavg(
        case.model,
        num_clients=case.clients,
        clients_per_round=case.clients,
        local=fl.LocalSGD(epochs=1, batch_size=50, lr=0.1),
    )
    state = algorithm.init(key.fold_in("init"))
    cuda = device.type == "cuda"
    before = _allocated(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    used: float | None = None
    with executor(spec, device) as ex:
        state, reports = fl.run_rounds(
            fl.make_round(algorithm, clients, ex), state, key, until=rounds
        )
        if cuda:
            torch.cuda.synchronize(device)
            free, total = torch.cuda.mem_get_info(device)
            used = (total - free) / MiB
    in_process = not spec.startswith("processes")
    peak = torch.cuda.max_memory_allocated(device) / MiB if cuda and in_process else None
    released = (_allocated(device) == before) if cuda and in_process else None
    later = [r.seconds for r in reports][1:] or [reports[0].seconds]
    return Row(
        case.name,
        spec,
        repeat,
        statistics.median(later),
        peak,
        used,
        released,
        fl.tree.digest(state.params),
    )


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_cases(rows: Sequence[Row], cpu: dict[str, float]) -> bool:
    """The case table; True when every case has one digest and memory was released."""
    print("| case | executor | repeat | round s | peak alloc MiB | device used MiB "
          "| released | params_sha256 |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        released = "-" if r.released is None else ("yes" if r.released else "NO")
        print(
            f"| {r.case} | {r.executor} | {r.repeat} | {r.round_seconds:.3f} "
            f"| {_fmt(r.peak_mib)} | {_fmt(r.device_used_mib)} | {released} | {r.digest[:16]} |"
        )
    ok = True
    print()
    for name in dict.fromkeys(r.case for r in rows):
        mine = [r for r in rows if r.case == name]
        digests = {r.digest for r in mine}
        fastest = min(r.round_seconds for r in mine)
        one = len(digests) == 1
        ok = ok and one and all(r.released is not False for r in mine)
        cpu_text = f"{cpu[name]:.3f} s" if name in cpu else "not run"
        print(
            f"{name}: one digest on the device: {'yes' if one else 'NO'} ({len(digests)}); "
            f"fastest round {fastest:.3f} s; CPU round {cpu_text}"
        )
    return ok


@attrs.frozen
class _Federation:
    data: FederatedDataset
    model_fn: Callable[[], torch.nn.Module]


def tiny_federation() -> _Federation:
    """8 clients of 24 CIFAR-shaped examples, 10 classes, 40 public inputs, a test set."""
    generator = fl.Key.from_seed(7).torch_generator()
    x = torch.randn(8 * 24, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (8 * 24,), generator=generator)
    base = TensorDataset(x, y)
    clients = tuple(ClientData(base, torch.arange(i * 24, (i + 1) * 24)) for i in range(8))
    test = TensorDataset(x[:32], y[:32])
    data = FederatedDataset(
        "tiny", clients, test, 10, public=torch.randn(40, 3, 32, 32, generator=generator)
    )
    return _Federation(data, functools.partial(cnn, (3, 32, 32), 10))


def algorithm_digests(
    device: torch.device, workers: int, names: Sequence[str]
) -> dict[str, dict[str, str]]:
    """Each of ``names`` for 2 rounds: digest per executor (and with the server there too).

    One executor of each kind serves every algorithm, as a long session would use it.
    """
    federation = tiny_federation()
    out: dict[str, dict[str, str]] = {}
    with (
        fl.Sequential(device) as sequential,
        fl.Threads(workers, devices=[device]) as threads,
        fl.Processes(workers, devices=[device]) as processes,
    ):
        executors: dict[str, fl.Executor] = {
            "sequential": sequential,
            f"threads:{workers}": threads,
            f"processes:{workers}": processes,
        }
        for name in names:
            # An image dataset by name (DS-FL and SCARLET need one); the data is built above.
            config = RunConfig(
                algorithm=name, dataset="mnist", data_dir="-", clients=8, clients_per_round=5,
                batch_size=8, lr=0.05, public_size=40, public_per_round=12, krum_f=1, krum_m=2,
            )  # fmt: skip
            algorithm = make_algorithm(config, federation.model_fn, 8, federation.data)
            found = {
                label: _two_rounds(algorithm, federation, ex, torch.device("cpu"))
                for label, ex in executors.items()
            }
            found["sequential+server"] = _two_rounds(algorithm, federation, sequential, device)
            out[name] = found
    return out


def _two_rounds(
    algorithm: fl.Algorithm[ClientData],
    federation: _Federation,
    ex: fl.Executor,
    server: torch.device,
) -> str:
    key = fl.Key.from_seed(0)
    placed = fl.on_server(algorithm, server)
    state = fl.executors.devices.to_device(placed.init(key.fold_in("init")), server)
    round_fn = fl.make_round(placed, federation.data.clients, ex)
    state, _ = fl.run_rounds(round_fn, state, key, until=2)
    return fl.tree.digest(state.params)


def print_algorithms(found: dict[str, dict[str, str]], device: torch.device) -> bool:
    """The algorithm table; True when each algorithm has one digest over the executors."""
    labels = list(next(iter(found.values())))
    print(f"| algorithm | {' | '.join(labels)} | one digest |")
    print("|---|" + "---|" * len(labels) + "---|")
    ok = True
    for name, digests in found.items():
        # With the server's model on the GPU, aggregation may round differently from the CPU
        # server: only the client-side executors must agree bit for bit.
        clients_side = {v for k, v in digests.items() if not k.endswith("+server")}
        one = len(clients_side) == 1
        ok = ok and one
        cells = " | ".join(digests[label][:12] for label in labels)
        print(f"| {name} | {cells} | {'yes' if one else 'NO'} |")
    print(f"\nevery algorithm gives one digest per executor on {device}: {'yes' if ok else 'NO'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU check: time, memory, one digest.")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu (smoke test)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="seconds-sized cases (smoke test)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison")
    parser.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        help="algorithms of the sweep, comma-separated ('' skips it)",
    )
    parser.add_argument("--executors", default=",".join(EXECUTORS), help="name:workers,...")
    parser.add_argument(
        "--vectorized",
        default="W1,W0,mnist-mlp,synthetic",
        help="cases of benchmarks.vectorized to run on the device ('' skips them)",
    )
    args = parser.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    specs = args.executors.split(",")
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    rows: list[Row] = []
    cpu_seconds: dict[str, float] = {}
    with intra_op_threads(1):
        for case in cases(args.tiny):
            for repeat in range(args.repeats):
                for spec in specs:
                    rows.append(run_case(case, spec, device, repeat, case.rounds))
            if not args.no_cpu and device.type == "cuda":
                cores = max(1, (os.cpu_count() or 2) // 2)
                cpu_row = run_case(case, f"threads:{cores}", torch.device("cpu"), 0, 1)
                cpu_seconds[case.name] = cpu_row.round_seconds
        print()
        ok = print_cases(rows, cpu_seconds)
        names = [n for n in args.algorithms.split(",") if n]
        unknown = sorted(set(names) - set(ALGORITHMS))
        if unknown:
            print(f"gpu_check: error: unknown algorithms {unknown}", file=sys.stderr)
            return 2
        if names:
            print()
            ok = print_algorithms(algorithm_digests(device, 2, names), device) and ok
    if args.vectorized:
        print("\nVectorized against the per-client executors (benchmarks.vectorized):")
        flags = ["--device", str(device), "--repeats", "2", "--cases", args.vectorized]
        ok = vectorized.main(flags + (["--tiny"] if args.tiny else [])) == 0 and ok
    print(f"\ngpu_check: {'OK' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
