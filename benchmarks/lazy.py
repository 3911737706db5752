"""What a lazy client costs: rounds over a million lazy Synthetic clients against the same rounds
over the same clients generated beforehand.

    OMP_NUM_THREADS=1 python -m benchmarks.lazy                  # 1,000,000 clients, 12 rounds
    python -m benchmarks.lazy --clients 1000 --rounds 3          # a quick look

Each round runs twice from the same state and key, on `Sequential`: once over the lazy
federation (`synthetic(..., lazy=True)`: a sampled client's data is generated when the round
reads it) and once over a federation of the same size whose sampled clients were generated
before the timer started (read from the lazy federation by the round's own sampling). Both
passes train the same clients on the same examples, so they must give the same bits (checked
every round), and their time per example differs by what generating costs inside a round. The
capped lognormal client sizes make the examples per round vary several-fold between rounds,
which is why the ratio is taken per round over the same clients and not against another
federation's rounds. The first round is left out (first-touch costs); each round's two passes
alternate which goes first, and each starts after a 64 MB write that evicts the clients' data
from the CPU's caches.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any, overload

import torch

import blazefl_fn as fl
from blazefl_fn.data import ClientData, synthetic
from blazefl_fn.models import logistic_regression
from blazefl_fn.round import RoundFn

__all__ = ["main"]

# Written before each pass: larger than any CPU's last-level cache.
_FLUSH_BYTES = 64 * 2**20


class _Kept(Sequence[ClientData]):
    """``n`` clients of which only those in ``kept`` can be read: generated beforehand."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.kept: dict[int, ClientData] = {}

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, k: int) -> ClientData: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[ClientData]: ...
    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            raise TypeError("read clients one by one")
        return self.kept[k]


def _timed(
    round_fn: RoundFn[Any], state: fl.ServerState[Any], key: fl.Key, flush: torch.Tensor
) -> tuple[fl.ServerState[Any], float]:
    flush.add_(1.0)  # both passes start with the clients' data out of the CPU's caches
    start = time.perf_counter()
    new, _ = round_fn(state, key)
    return new, time.perf_counter() - start


def run(clients: int, per_round: int, rounds: int) -> list[dict[str, Any]]:
    """Per round: examples, the lazy and the ready pass's seconds (see the module docstring).

    Raises:
        AssertionError: the two passes of a round gave different bits.
    """
    data = synthetic(1.0, 1.0, clients, fl.Key.from_seed(0), lazy=True)
    lazy = data.clients
    ready = _Kept(len(lazy))
    algo = fl.fedavg(
        functools.partial(logistic_regression, (60,), 10),
        num_clients=len(lazy),
        clients_per_round=per_round,
        local=fl.LocalSGD(epochs=1, batch_size=10, lr=0.01),
    )
    executor = fl.Sequential()
    lazy_round = fl.make_round(algo, lazy, executor)
    ready_round = fl.make_round(algo, ready, executor)
    # Which clients a round reads: its own sampling (`run_round` draws from this key child).
    sample = algo.sample
    state = algo.init(fl.Key.from_seed(2))
    base = fl.Key.from_seed(1)
    flush = torch.zeros(_FLUSH_BYTES // 4)
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        key = base.fold_in(state.round)
        ids = [int(i) for i in sample(state, key.fold_in("sample"))]
        ready.kept = {i: lazy[i] for i in ids}
        examples = sum(len(c) for c in ready.kept.values())
        passes: dict[str, tuple[fl.ServerState[Any], float]] = {}
        for name in ("lazy", "ready") if r % 2 == 0 else ("ready", "lazy"):
            passes[name] = _timed(lazy_round if name == "lazy" else ready_round, state, key, flush)
        (new, lazy_s), (other, ready_s) = passes["lazy"], passes["ready"]
        assert fl.tree.digest(new.params) == fl.tree.digest(other.params), f"round {r}"
        rows.append({"round": r, "examples": examples, "lazy_s": lazy_s, "ready_s": ready_s})
        state = new
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the first is left out), got {args.rounds}")
    if not 1 <= args.per_round <= args.clients:
        parser.error(f"--per-round must be in [1, --clients], got {args.per_round}")
    rows = run(args.clients, args.per_round, args.rounds)[1:]
    print(f"{args.clients:,} lazy Synthetic(1, 1) clients, {args.per_round} per round, "
          f"Sequential, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("\n| round | examples | lazy µs/example | ready µs/example | lazy / ready |")
    print("|---:|---:|---:|---:|---:|")
    ratios: list[float] = []
    for row in rows:
        lazy, ready = (1e6 * row[k] / row["examples"] for k in ("lazy_s", "ready_s"))
        ratios.append(lazy / ready)
        print(f"| {row['round']} | {row['examples']} | {lazy:.2f} | {ready:.2f} | "
              f"{lazy / ready:.3f}x |")  # fmt: skip
    generation = sum(r["lazy_s"] - r["ready_s"] for r in rows) / sum(r["examples"] for r in rows)
    print(f"\nmedian lazy / ready: {statistics.median(ratios):.3f}x; generation "
          f"{1e6 * generation:.2f} µs per example (lazy minus ready, all rounds)")  # fmt: skip
    print("bits: the same in both passes of every round")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
