"""The privacy/accuracy trade-off of DP-FedAvg on MNIST: three noise levels and no noise.

Each run is FedAvg with central client-level DP (`blazefl_fn.privacy`): updates clipped to
``--clip``, Gaussian noise of ``z * clip`` on their sum each round, Poisson sampling at rate
``clients_per_round / clients``. The table gives, per noise multiplier ``z``, the epsilon
spent after ``--rounds`` rounds (at ``--delta``, RDP accountant) and the final test accuracy.
Needs the privacy extra (``pip install 'blazefl_fn[privacy]'``).

    blazefl-fn data mnist ~/data/mnist      # once: MNIST, downloaded and verified
    python examples/dp_mnist.py --data-dir ~/data/mnist --rounds 50
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import attrs

import blazefl_fn as fl


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DP-FedAvg's privacy/accuracy trade-off")
    parser.add_argument("--data-dir", required=True, help="the MNIST IDX files")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="noise multipliers z"
    )
    parser.add_argument("--executor", default="threads")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float | None]]:
    """Run the noise levels and print the table; returns each row by its label."""
    args = parse(argv)
    base = fl.RunConfig(
        dataset="mnist",
        data_dir=args.data_dir,
        model="logreg",
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        lr=args.lr,
        batch_size=10,
        executor=args.executor,
        eval_every=args.rounds,
    )
    rows: dict[str, dict[str, float | None]] = {}
    no_dp = fl.simulate(base)
    rows["no DP"] = {"z": None, "epsilon": None, "accuracy": no_dp.accuracy}
    for z in args.noise:
        config = attrs.evolve(
            base, dp="central", dp_clip=args.clip, dp_noise_multiplier=z, dp_delta=args.delta
        )
        result = fl.simulate(config)
        epsilon = None if result.privacy is None else result.privacy["epsilon"]
        rows[f"z={z:g}"] = {"z": z, "epsilon": epsilon, "accuracy": result.accuracy}
    q = args.clients_per_round / args.clients
    lines = [
        f"DP-FedAvg on MNIST (logreg): {args.clients} clients, q={q:g} (Poisson), "
        f"clip {args.clip:g}, {args.rounds} rounds, delta={args.delta:g}",
        "",
        "| noise multiplier z | epsilon | test accuracy |",
        "|---|---|---|",
    ]
    for label, row in rows.items():
        epsilon = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        lines.append(f"| {label} | {epsilon} | {row['accuracy']:.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
