"""DS-FL and SCARLET side by side on MNIST: accuracy per round and cumulative bytes.

The public set is a held-out part of the MNIST training set with its labels dropped; the rest
is split over the clients with a Dirichlet(alpha) label skew. Both algorithms see the same
data, the same client sampling and the same public samples each round (one seed); only the
aggregation (ERA vs Enhanced ERA) and SCARLET's soft-label cache differ.

    blazefl-fn data mnist ~/data/mnist      # once: MNIST, downloaded and verified
    python examples/dsfl_vs_scarlet.py --data-dir ~/data/mnist --rounds 40 --every 4

(about 8 minutes on 2 cores; the measured table is in docs/distillation.md).

Prints a per-round table (server test accuracy, cumulative MB) and a summary line with the
byte savings of SCARLET and the accuracy gap; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import attrs

import blazefl_fn as fl


@attrs.define
class Trace(fl.Callback):
    """Collects accuracy and bytes of every round."""

    rows: list[dict[str, float]] = attrs.field(factory=list[dict[str, float]])

    def on_round_end(self, event: fl.RoundEvent) -> None:
        before = self.rows[-1] if self.rows else {"down": 0.0, "up": 0.0}
        self.rows.append(
            {
                "round": event.state.round,
                "accuracy": (event.metrics or {}).get("accuracy", float("nan")),
                "down": before["down"] + event.report.bytes_down,
                "up": before["up"] + event.report.bytes_up,
                "seconds": event.report.seconds,
            }
        )


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--data-dir", required=True, help="directory of the MNIST IDX files")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--clients-per-round", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew")
    p.add_argument("--public-size", type=int, default=5000)
    p.add_argument("--public-per-round", type=int, default=1000)
    p.add_argument("--cache-duration", type=int, default=10)
    p.add_argument("--era-temperature", type=float, default=0.1)
    p.add_argument("--era-exponent", type=float, default=2.0)
    p.add_argument("--kd-epochs", type=int, default=2)
    p.add_argument("--executor", choices=("sequential", "threads", "processes"), default="threads")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=4, help="rounds between table rows")
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--markdown", help="also write the tables to this file")
    return p.parse_args(argv)


def _config(args: argparse.Namespace, algorithm: str) -> fl.RunConfig:
    return fl.RunConfig(
        algorithm=algorithm,
        dataset="mnist",
        data_dir=args.data_dir,
        model="cnn",
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        batch_size=50,
        lr=0.05,
        partition="dirichlet",
        alpha=args.alpha,
        seed=args.seed,
        executor=args.executor,
        workers=args.workers,
        public_size=args.public_size,
        public_per_round=args.public_per_round,
        era_temperature=args.era_temperature,
        cache_duration=args.cache_duration,
        era_exponent=args.era_exponent,
        kd_epochs=args.kd_epochs,
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def tables(traces: dict[str, list[dict[str, float]]], every: int) -> str:
    """The per-round table and the summary, as markdown."""
    dsfl, scarlet = traces["dsfl"], traces["scarlet"]
    lines = [
        "| round | DS-FL acc | SCARLET acc | DS-FL MB (down+up) | SCARLET MB (down+up) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(dsfl, scarlet, strict=True):
        r = int(a["round"])
        if r % every and r != len(dsfl):
            continue
        lines.append(
            f"| {r} | {a['accuracy']:.4f} | {b['accuracy']:.4f} "
            f"| {_mb(a['down'] + a['up'])} | {_mb(b['down'] + b['up'])} |"
        )
    total_a = dsfl[-1]["down"] + dsfl[-1]["up"]
    total_b = scarlet[-1]["down"] + scarlet[-1]["up"]
    lines += [
        "",
        "| | DS-FL | SCARLET | SCARLET vs DS-FL |",
        "|---|---:|---:|---:|",
        f"| final accuracy | {dsfl[-1]['accuracy']:.4f} | {scarlet[-1]['accuracy']:.4f} "
        f"| {100 * (scarlet[-1]['accuracy'] - dsfl[-1]['accuracy']):+.2f} points |",
        f"| MB down | {_mb(dsfl[-1]['down'])} | {_mb(scarlet[-1]['down'])} "
        f"| {100 * (1 - scarlet[-1]['down'] / dsfl[-1]['down']):.1f}% fewer |",
        f"| MB up | {_mb(dsfl[-1]['up'])} | {_mb(scarlet[-1]['up'])} "
        f"| {100 * (1 - scarlet[-1]['up'] / dsfl[-1]['up']):.1f}% fewer |",
        f"| MB total | {_mb(total_a)} | {_mb(total_b)} "
        f"| {100 * (1 - total_b / total_a):.1f}% fewer |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Run both algorithms; print and optionally write the comparison."""
    args = _args(argv)
    traces: dict[str, list[dict[str, float]]] = {}
    for algorithm in ("dsfl", "scarlet"):
        trace = Trace()
        result = fl.simulate(_config(args, algorithm), [trace])
        traces[algorithm] = trace.rows
        print(
            f"{algorithm}: accuracy {result.accuracy:.4f}  sha {result.params_sha256[:16]}  "
            f"{result.wall_seconds:.0f} s",
            file=sys.stderr,
        )
    text = tables(traces, args.every)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"args": vars(args), "rounds": traces}, out, indent=1)
    return traces


if __name__ == "__main__":
    main()
