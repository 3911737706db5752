"""The ``blazefl-fn`` command line (also ``python -m blazefl_fn``).

Errors in flags or data exit with status 2 (usage) or 1 (data, run) and one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from .data.partition import partition_report
from .keys import Key
from .records import RoundReport
from .run import (
    ALGORITHMS,
    DATASETS,
    EXECUTORS,
    MODELS,
    PARTITIONS,
    RoundCallback,
    RunConfig,
    load_central,
    simulate,
    split,
)

__all__ = ["main"]

PROG = "blazefl-fn"


class UsageError(Exception):
    """A bad command line; reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line is easier to read and to grep.
        raise UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Fast, deterministic federated-learning simulation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run a federated simulation",
        description="Run a federated simulation and report test accuracy.",
    )
    defaults = RunConfig()
    run.add_argument("--algorithm", choices=ALGORITHMS, default=defaults.algorithm)
    run.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    run.add_argument(
        "--data-dir", help="directory of the dataset files (MNIST IDX, CIFAR python or binary)"
    )
    run.add_argument(
        "--model",
        choices=MODELS,
        default=defaults.model,
        help="auto: logreg on synthetic, mlp on mnist",
    )
    run.add_argument("--clients", type=int, default=defaults.clients, help="clients in total")
    run.add_argument(
        "--clients-per-round", type=int, default=defaults.clients_per_round, metavar="K"
    )
    run.add_argument("--rounds", type=int, default=defaults.rounds)
    run.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    run.add_argument("--batch-size", type=int, default=defaults.batch_size)
    run.add_argument("--lr", type=float, default=defaults.lr, help="local SGD learning rate")
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--executor", choices=EXECUTORS, default=defaults.executor)
    run.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="threads or processes running clients (ignored by sequential)",
    )
    run.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    run.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="test every N rounds"
    )
    _add_partition_flags(run, defaults)
    run.add_argument(
        "--augment",
        action="store_true",
        help="CIFAR recipe: random crop (padding 4) and horizontal flip, from the client's key",
    )
    run.add_argument(
        "--synthetic-alpha",
        type=float,
        default=defaults.synthetic_alpha,
        help="Synthetic(alpha, beta): model heterogeneity",
    )
    run.add_argument(
        "--synthetic-beta",
        type=float,
        default=defaults.synthetic_beta,
        help="Synthetic(alpha, beta): data heterogeneity",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the final results on stdout (progress goes to stderr)",
    )
    part = commands.add_parser(
        "partition",
        help="print how a dataset is split over clients",
        description="Partition a dataset as `run` would and print per-client class counts.",
    )
    part.add_argument("--dataset", choices=DATASETS[1:], default="mnist")
    part.add_argument("--data-dir", required=True, help="directory of the dataset files")
    part.add_argument("--clients", type=int, default=defaults.clients)
    part.add_argument("--seed", type=int, default=defaults.seed)
    _add_partition_flags(part, defaults)
    part.add_argument("--json", action="store_true", help="print the counts as JSON")
    return parser


def _add_partition_flags(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    parser.add_argument(
        "--partition",
        choices=PARTITIONS,
        default=None,
        help="how image datasets are split over clients (default iid)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help="Dirichlet concentration for dirichlet and inner-dirichlet (smaller = more skew)",
    )
    parser.add_argument(
        "--shards-per-client",
        type=int,
        default=defaults.shards_per_client,
        metavar="S",
        help="label-sorted shards per client for the shards partition",
    )


def _partition_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        clients=args.clients,
        clients_per_round=1,
        seed=args.seed,
        partition=args.partition,
        alpha=args.alpha,
        shards_per_client=args.shards_per_client,
    )


def _partition(args: argparse.Namespace, config: RunConfig) -> int:
    train, _, classes = load_central(config)
    key = Key.from_seed(config.seed).fold_in("data").fold_in("partition")
    report = partition_report(train.y, split(config, train.y, key), classes)
    if args.json:
        print(json.dumps({"counts": report.counts, "sizes": report.sizes}))
    else:
        print(report)
    return 0


def _config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        algorithm=args.algorithm,
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=args.model,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        executor=args.executor,
        workers=args.workers,
        threads=args.threads,
        eval_every=args.eval_every,
        synthetic_alpha=args.synthetic_alpha,
        synthetic_beta=args.synthetic_beta,
        partition=args.partition,
        alpha=args.alpha,
        shards_per_client=args.shards_per_client,
        augment=args.augment,
    )


def _progress(out: TextIO, total: int) -> RoundCallback:
    width = len(str(total))

    def on_round(report: RoundReport, metrics: dict[str, float] | None) -> None:
        line = (
            f"round {report.round + 1:>{width}}/{total}  clients {len(report.clients)}"
            f"  train_loss {report.train_metrics.get('loss', float('nan')):.4f}"
        )
        if metrics is not None:
            line += f"  test_acc {metrics['accuracy']:.4f}  test_loss {metrics['loss']:.4f}"
        out.write(f"{line}  {report.seconds:.2f}s\n")
        out.flush()

    return on_round


def _run(args: argparse.Namespace, config: RunConfig) -> int:
    progress = sys.stderr if args.json else sys.stdout
    result = simulate(config, _progress(progress, config.rounds))
    summary = {
        "algorithm": config.algorithm,
        "dataset": config.dataset,
        "rounds": len(result.reports),
        "clients": config.clients,
        "clients_per_round": config.clients_per_round,
        "seed": config.seed,
        "partition": config.partition,
        "executor": config.executor,
        "workers": config.workers,
        "accuracy": result.accuracy,
        "loss": result.loss,
        "params_sha256": result.params_sha256,
        "wall_seconds": round(result.wall_seconds, 3),
        "bytes_up": sum(r.bytes_up for r in result.reports),
        "bytes_down": sum(r.bytes_down for r in result.reports),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"final accuracy {result.accuracy:.4f}  loss {result.loss:.4f}"
            f"  params_sha256 {result.params_sha256}  wall {result.wall_seconds:.1f}s"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    try:
        args = _parser().parse_args(argv)
        config = _config(args) if args.command == "run" else _partition_config(args)
    except (UsageError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, config) if args.command == "run" else _partition(args, config)
    except (ValueError, OSError) as exc:
        # Bad or missing data files: the loaders' messages name the file and the problem.
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
