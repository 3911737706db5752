"""What 128-bit random streams cost per client: making generators, and a whole W0 round.

W0 is the workload where per-client overhead matters most: the small CNN on CIFAR-shaped
random inputs, 1000 clients x 50 examples, batch 50 (one local step), lr 0.1, every client in
the one round, on `Sequential` (one worker, so each client's cost is whole).

- ``generators``: for the round's 1000 client keys, the time to make the generator local
  training makes per client (`Key.torch_generator`), against stream version 1's
  ``torch.Generator().manual_seed(first 64 bits)``; both interleaved in this process, median
  over ``--repeats``, in microseconds per client.
- ``round``: the median over ``--repeats`` of one W0 round (after a warm-up round), in ms per
  client. It runs on whichever blazefl_fn is imported, and prints that version's streams: with
  ``PYTHONPATH`` pointing at a checkout of 0.1.0 the same script times the old streams.

    python -m benchmarks.streams                     # both parts (~1 min on 2 cores)
    python -m benchmarks.streams --parts round --repeats 5
    python -m benchmarks.streams --tiny              # seconds: the suite's smoke test
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

import blazefl_fn as fl
from blazefl_fn.data import ClientData, TensorDataset
from blazefl_fn.models import cnn, intra_op_threads


def _version_1(key: fl.Key) -> torch.Generator:
    """Stream version 1's generator (0.1.0): seeded with 64 bits, of which mt19937 kept 32."""
    return torch.Generator().manual_seed(int.from_bytes(key.bits[:8], "little"))


def _w0(clients: int, samples: int) -> tuple[ClientData, ...]:
    generator = fl.Key.from_seed(0).fold_in("w0").torch_generator()
    n = clients * samples
    base = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )
    return tuple(
        ClientData(base, torch.arange(i * samples, (i + 1) * samples)) for i in range(clients)
    )


def _per_client_us(make: Callable[[fl.Key], torch.Generator], keys: Sequence[fl.Key]) -> float:
    start = time.perf_counter()
    for key in keys:
        make(key)
    return (time.perf_counter() - start) / len(keys) * 1e6


def generators(clients: int, repeats: int) -> tuple[float, float]:
    """Median microseconds per client to make its generator: (version 1, this version)."""
    round_key = fl.Key.from_seed(0).fold_in(0)
    keys = [round_key.fold_in(cid) for cid in range(clients)]
    old: list[float] = []
    new: list[float] = []
    for _ in range(repeats):
        old.append(_per_client_us(_version_1, keys))
        new.append(_per_client_us(fl.Key.torch_generator, keys))
    return statistics.median(old), statistics.median(new)


def w0_round(clients: int, repeats: int) -> tuple[float, str]:
    """Median seconds of one W0 round over ``repeats`` (after a warm-up) and the digest."""
    data = _w0(clients, 50)
    algorithm = fl.fedavg(
        functools.partial(cnn, (3, 32, 32), 10),
        num_clients=clients,
        clients_per_round=clients,
        local=fl.LocalSGD(batch_size=50, lr=0.1),
    )
    key = fl.Key.from_seed(0)
    seconds: list[float] = []
    with intra_op_threads(1), fl.Sequential() as executor:
        state = algorithm.init(key.fold_in("init"))
        round_fn = fl.make_round(algorithm, data, executor)
        after, _ = round_fn(state, key.fold_in(0))  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            again, _ = round_fn(state, key.fold_in(0))
            seconds.append(time.perf_counter() - start)
            assert fl.tree.digest(again.params) == fl.tree.digest(after.params)
    return statistics.median(seconds), fl.tree.digest(after.params)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streams", description=__doc__)
    parser.add_argument("--parts", default="generators,round", help="from generators, round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="20 clients: a smoke run")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := [p for p in parts if p not in ("generators", "round")]:
        parser.error(f"--parts takes generators and/or round, got {','.join(unknown)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    clients = 20 if args.tiny else 1000
    streams = getattr(fl, "STREAMS_VERSION", 1)
    print(
        f"blazefl_fn {fl.__version__}, streams version {streams}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}, {clients} clients, {args.repeats} repeats"
    )
    if "generators" in parts:
        old, new = generators(clients, args.repeats)
        print("\n| generator per client | median us |\n|---|---:|")
        print(f"| streams version 1 (manual_seed, 32 bits) | {old:.2f} |")
        print(f"| Key.torch_generator (streams version {streams}) | {new:.2f} |")
        print(f"| difference | {new - old:+.2f} |")
    if "round" in parts:
        seconds, digest = w0_round(clients, args.repeats)
        print("\n| W0 round (sequential) | median s | ms per client | params_sha256 |")
        print("|---|---:|---:|---|")
        print(
            f"| streams version {streams} | {seconds:.3f} | {seconds / clients * 1e3:.3f} "
            f"| {digest[:16]} |"
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
