"""The ``blazefl-fn`` command line's flags: one argparse parser for ``run``, ``plot``,
``partition`` and ``data``, whose ``run`` defaults are `RunConfig`'s."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

import attrs

from .._validators import check_local_ip, check_ray_address, documented_range
from ..data.download import check_url
from ..run.config import ALGORITHMS, DATASETS, DP_MODES, EXECUTORS, MODELS, PARTITIONS, RunConfig
from ..run.simulate import RESUMABLE_CHANGES
from ._signals import PROG

# --workers beyond this many per CPU on one machine needs --oversubscribe.
OVERSUBSCRIPTION = 4


class UsageError(Exception):
    """A bad command line; reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line is easier to read and to grep.
        raise UsageError(message)


class _Suppressed:
    """Stands in for `RunConfig` defaults so that only flags given on the command line parse."""

    def __getattr__(self, name: str) -> str:
        return argparse.SUPPRESS


def build_parser(*, only_given: bool = False) -> _Parser:
    """The command line's parser; with ``only_given``, only flags given on it parse."""
    parser = _Parser(prog=PROG, description="Fast, deterministic federated-learning simulation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run a federated simulation",
        description="Run a federated simulation and report test accuracy.",
    )
    defaults: Any = _Suppressed() if only_given else RunConfig()
    for add in (
        _add_problem, _add_execution, _add_data_flags, _add_algorithm_flags, _add_privacy_flags,
        _add_distillation_flags, _add_outputs,
    ):  # fmt: skip
        add(run, defaults)
    _add_plot_command(commands)
    _add_partition_command(commands, defaults)
    add_data_command(commands)
    add_sweep_command(commands)
    return parser


def _add_problem(run: argparse.ArgumentParser, defaults: Any) -> None:
    """``run``'s problem and training settings: the experiment file, algorithm, data, model,
    counts, learning rate, seed."""
    run.add_argument(
        "--config",
        metavar="FILE",
        help="an experiment file (TOML): each key a flag of run (data_dir or data-dir); flags "
        "given here override it",
    )
    run.add_argument("--algorithm", choices=ALGORITHMS, default=defaults.algorithm)
    run.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    run.add_argument(
        "--data-dir",
        default=defaults.data_dir,
        help="directory of the dataset files (MNIST IDX, CIFAR python or binary)",
    )
    run.add_argument(
        "--model",
        choices=MODELS,
        default=defaults.model,
        help="auto: logreg on synthetic (mlp for fedrep and fedper), mlp on mnist, cnn on cifar",
    )
    run.add_argument("--clients", type=int, default=defaults.clients, help="clients in total")
    run.add_argument(
        "--clients-per-round", type=int, default=defaults.clients_per_round, metavar="K"
    )
    run.add_argument("--rounds", type=int, default=defaults.rounds)
    run.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    run.add_argument("--batch-size", type=int, default=defaults.batch_size)
    run.add_argument(
        "--drop-last",
        action="store_true",
        default=defaults.drop_last,
        help="leave out each epoch's final local batch when it is smaller than --batch-size "
        "(a BatchNorm model cannot train on a batch of one example)",
    )
    run.add_argument("--lr", type=float, default=defaults.lr, help="local SGD learning rate")
    run.add_argument("--seed", type=int, default=defaults.seed)


def _add_execution(run: argparse.ArgumentParser, defaults: Any) -> None:
    """``run``'s execution: executor, workers, Ray, timeouts, chunks, client-state placement,
    threads, numerics, devices."""
    run.add_argument("--executor", choices=EXECUTORS, default=defaults.executor)
    run.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="threads, processes or Ray actors running clients (ignored by sequential)",
    )
    run.add_argument(
        "--oversubscribe",
        action="store_true",
        help=f"allow --workers above {OVERSUBSCRIPTION}x this machine's CPUs (threads, "
        "processes, a local Ray instance)",
    )
    run.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=defaults.ray_address,
        help="with --executor ray: join the Ray cluster at ADDR (host:port or auto) and leave "
        "it running; default: start a local Ray instance for this run",
    )
    run.add_argument(
        "--ray-node-ip",
        metavar="IP",
        default=defaults.ray_node_ip,
        help="with --executor ray: this machine's Ray node IP (e.g. a loopback address to keep "
        "a single-machine cluster off the network)",
    )
    run.add_argument(
        "--client-timeout",
        type=float,
        metavar="SECONDS",
        default=defaults.client_timeout,
        help="with --executor processes or ray: fail the run (exit 3) when a worker spends "
        "longer than SECONDS on one client (stuck, stopped); in (0, 1e6]; default: no limit",
    )
    run.add_argument(
        "--chunk",
        type=int,
        metavar="N",
        default=defaults.chunk,
        help="with --executor vectorized: clients trained per vectorised step (default: all "
        "sampled clients, or as many as --max-bytes allows)",
    )
    run.add_argument(
        "--max-bytes",
        type=int,
        metavar="B",
        default=defaults.max_bytes,
        help="with --executor vectorized: a memory budget for one chunk, in bytes",
    )
    run.add_argument(
        "--client-state-memory-mb",
        type=int,
        metavar="MB",
        default=defaults.client_state_memory_mb,
        help="the algorithms whose clients keep state (scaffold, feddyn, dsfl, scarlet, ditto, "
        "fedrep, fedper): MiB of it kept in memory, the rest spilled to files (default 1024; 0 "
        "spills all)",
    )
    run.add_argument(
        "--client-state-dir",
        metavar="DIR",
        default=defaults.client_state_dir,
        help="the algorithms whose clients keep state: where spilled client state goes "
        "(default: the system's temporary directory)",
    )
    run.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    run.add_argument(
        "--portable",
        action="store_true",
        default=defaults.portable,
        help="portable numerics: pin the CPU kernels to their baseline paths, so the run gives "
        "the same bits on any x86-64 CPU model (slower; CPU only; see the README)",
    )
    run.add_argument(
        "--device",
        default=defaults.device,
        metavar="DEVICES",
        help="where clients train: cpu, cuda, cuda:0,cuda:1 (client k on the k%%n-th), or auto "
        "(every visible GPU, else cpu)",
    )
    run.add_argument(
        "--server-device",
        default=defaults.server_device,
        metavar="DEVICE",
        help="where the global model is aggregated and evaluated (cpu, cuda, cuda:1, ...)",
    )


def _add_data_flags(run: argparse.ArgumentParser, defaults: Any) -> None:
    """``run``'s evaluation cadence, partition, augmentation and the synthetic data's shape."""
    run.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="test every N rounds"
    )
    add_partition_flags(run, defaults)
    run.add_argument(
        "--augment",
        action="store_true",
        default=defaults.augment,
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


def _add_algorithm_flags(run: argparse.ArgumentParser, defaults: Any) -> None:
    """The algorithms' hyperparameters."""
    algo = run.add_argument_group("algorithm hyperparameters")
    algo.add_argument("--mu", type=float, default=defaults.mu, help="fedprox: proximal term weight")
    algo.add_argument(
        "--server-lr",
        type=float,
        default=defaults.server_lr,
        help="fedavgm/fedadam/fedyogi/fedadagrad/scaffold server learning rate "
        "(default 1.0, 0.01, 0.01, 0.1, 1.0)",
    )
    algo.add_argument(
        "--server-momentum",
        type=float,
        default=defaults.server_momentum,
        help="fedavgm: server momentum",
    )
    algo.add_argument(
        "--beta1", type=float, default=defaults.beta1, help="fedadam/fedyogi: first moment"
    )
    algo.add_argument(
        "--beta2", type=float, default=defaults.beta2, help="fedadam/fedyogi: second moment"
    )
    algo.add_argument(
        "--tau", type=float, default=defaults.tau, help="fedadam/fedyogi/fedadagrad: adaptivity"
    )
    algo.add_argument(
        "--trim-beta",
        type=float,
        default=defaults.trim_beta,
        help="trimmed-mean: fraction trimmed from each end",
    )
    algo.add_argument(
        "--krum-f", type=int, default=defaults.krum_f, help="krum: Byzantine clients tolerated"
    )
    algo.add_argument(
        "--krum-m", type=int, default=defaults.krum_m, help="krum: clients averaged (Multi-Krum)"
    )
    algo.add_argument(
        "--clip-norm",
        type=float,
        default=defaults.clip_norm,
        help="clip each client's update to this L2 norm before aggregating (any algorithm)",
    )
    algo.add_argument(
        "--feddyn-alpha",
        type=float,
        default=defaults.feddyn_alpha,
        help="feddyn: weight of the dynamic regulariser (> 0)",
    )
    algo.add_argument(
        "--local-momentum",
        type=float,
        default=defaults.local_momentum,
        help="fednova: momentum of local SGD, in [0, 1)",
    )
    algo.add_argument(
        "--ditto-lambda",
        type=float,
        default=defaults.ditto_lambda,
        help="ditto: weight of the personal model's pull toward the global one (>= 0)",
    )
    algo.add_argument(
        "--personal-epochs",
        type=int,
        default=defaults.personal_epochs,
        metavar="E",
        help="ditto: local epochs of the personal model (default: --local-epochs)",
    )
    algo.add_argument(
        "--head-epochs",
        type=int,
        default=defaults.head_epochs,
        metavar="E",
        help="fedrep: epochs on the personal head before the body's --local-epochs",
    )
    algo.add_argument(
        "--head",
        default=defaults.head,
        metavar="NAMES",
        help="fedrep, fedper: the personal parameters, names or module prefixes separated by "
        "commas (default: the model's last layer)",
    )


def _add_privacy_flags(run: argparse.ArgumentParser, defaults: Any) -> None:
    """Client-level differential privacy."""
    dp = run.add_argument_group(
        "client-level differential privacy (needs the privacy extra: blazefl_fn[privacy])"
    )
    dp.add_argument(
        "--dp",
        choices=DP_MODES,
        default=defaults.dp,
        help="central: the server clips, sums and noises (DP-FedAvg); local: each client "
        "clips and noises its own update",
    )
    dp.add_argument(
        "--dp-clip",
        type=float,
        default=defaults.dp_clip,
        metavar="C",
        help="L2 clip norm of each client's update (the initial one with adaptive clipping)",
    )
    dp.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=defaults.dp_noise_multiplier,
        metavar="Z",
        help="noise standard deviation / clip norm",
    )
    dp.add_argument("--dp-delta", type=float, default=defaults.dp_delta, metavar="D")
    dp.add_argument(
        "--dp-target-epsilon",
        type=float,
        default=defaults.dp_target_epsilon,
        metavar="E",
        help="stop before the round that would spend more than this epsilon",
    )
    dp.add_argument(
        "--dp-accountant",
        choices=("rdp", "prv"),
        default=defaults.dp_accountant,
        help="Opacus accountant for the sampled Gaussian mechanism",
    )
    dp.add_argument(
        "--dp-sampling",
        choices=("poisson", "fixed"),
        default=defaults.dp_sampling,
        help="poisson (what the accountant assumes; K clients per round on average) or fixed "
        "(exactly K; the accountant's bound is then an approximation)",
    )
    dp.add_argument(
        "--dp-adaptive-quantile",
        type=float,
        default=defaults.dp_adaptive_quantile,
        metavar="Q",
        help="central: adapt the clip norm to this quantile of update norms (Andrew et al.)",
    )
    dp.add_argument(
        "--dp-clip-lr",
        type=float,
        default=defaults.dp_clip_lr,
        help="adaptive clipping: geometric learning rate of the clip norm",
    )
    dp.add_argument(
        "--dp-count-noise",
        type=float,
        default=defaults.dp_count_noise,
        help="adaptive clipping: noise std of the unclipped count (default: K / 20)",
    )


def _add_distillation_flags(run: argparse.ArgumentParser, defaults: Any) -> None:
    """DS-FL's and SCARLET's distillation settings."""
    kd = run.add_argument_group("distillation (dsfl, scarlet)")
    kd.add_argument(
        "--public-size",
        type=int,
        default=defaults.public_size,
        help="training examples held out, labels dropped, as the public set",
    )
    kd.add_argument(
        "--public-per-round",
        type=int,
        default=defaults.public_per_round,
        help="public examples whose soft labels each round uses",
    )
    kd.add_argument(
        "--era-temperature",
        type=float,
        default=defaults.era_temperature,
        help="dsfl: ERA temperature T in softmax(mean / T)",
    )
    kd.add_argument(
        "--cache-duration",
        type=int,
        default=defaults.cache_duration,
        help="scarlet: rounds a cached soft label stays usable (0: no cache)",
    )
    kd.add_argument(
        "--era-exponent",
        type=float,
        default=defaults.era_exponent,
        help="scarlet: Enhanced ERA exponent beta in p**beta / sum(p**beta)",
    )
    kd.add_argument("--kd-epochs", type=int, default=defaults.kd_epochs)
    kd.add_argument("--kd-batch-size", type=int, default=defaults.kd_batch_size)
    kd.add_argument(
        "--kd-lr", type=float, default=defaults.kd_lr, help="distillation learning rate"
    )


def _add_outputs(run: argparse.ArgumentParser, defaults: Any) -> None:
    """What ``run`` reports and writes: early stop, evaluation on clients, non-finite policy, JSON,
    progress, metrics log, checkpoints, resume."""
    run.add_argument(
        "--target-accuracy",
        type=float,
        default=defaults.target_accuracy,
        metavar="A",
        help="stop early once the test accuracy reaches A",
    )
    run.add_argument(
        "--eval-clients",
        action="store_true",
        default=defaults.eval_clients,
        help="also evaluate every client on its own data (the global model, or its personal "
        "one): mean, 10th percentile and standard deviation of its accuracy",
    )
    run.add_argument(
        "--client-test-fraction",
        type=float,
        metavar="F",
        default=defaults.client_test_fraction,
        help="hold out this fraction of every client's examples as its own test split, never "
        "trained on, and evaluate every client on it (implies --eval-clients)",
    )
    run.add_argument(
        "--skip-nonfinite",
        action="store_true",
        default=defaults.skip_nonfinite,
        help="leave clients whose update holds NaN or Inf out of the round (default: the run "
        "fails with an error naming them)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the final results on stdout (progress goes to stderr)",
    )
    run.add_argument("--quiet", action="store_true", help="print no progress")
    run.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback before the one-line message "
        "(also: BLAZEFL_FN_DEBUG=1)",
    )
    run.add_argument(
        "--metrics", metavar="FILE", help="append one JSON line per round to FILE (JSON Lines)"
    )
    run.add_argument("--checkpoint-dir", metavar="DIR", help="save checkpoints into DIR")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="K",
        help="rounds between checkpoints (also saved after the last round and on Ctrl-C)",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run checkpointed in DIR (its settings; flags may change only "
        + ", ".join(sorted(name.replace("_", "-") for name in RESUMABLE_CHANGES))
        + ")",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="let a fresh run replace the checkpoint in --checkpoint-dir and the --metrics log "
        "(refused by default)",
    )


def _add_plot_command(commands: Any) -> None:
    """The ``plot`` command."""
    plot = commands.add_parser(
        "plot",
        help="plot accuracy and loss curves from metrics logs",
        description="Draw test accuracy, test loss and train loss per round of one or more runs.",
    )
    plot.add_argument("logs", nargs="+", metavar="METRICS.jsonl", help="metrics logs (--metrics)")
    plot.add_argument("-o", "--output", required=True, help="image file (.png, .svg, .pdf)")
    plot.add_argument("--labels", help="comma-separated legend labels, one per log")


def _add_partition_command(commands: Any, defaults: Any) -> None:
    """The ``partition`` command."""
    part = commands.add_parser(
        "partition",
        help="print how a dataset is split over clients",
        description="Partition a dataset as `run` would and print per-client class counts.",
    )
    part.add_argument("--dataset", choices=DATASETS[1:], default="mnist")
    part.add_argument("--data-dir", required=True, help="directory of the dataset files")
    part.add_argument("--clients", type=int, default=defaults.clients)
    part.add_argument("--seed", type=int, default=defaults.seed)
    add_partition_flags(part, defaults)
    part.add_argument("--json", action="store_true", help="print the counts as JSON")


def _jobs(text: str) -> int:
    """A ``--jobs`` value: a whole number of cells, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of cells: {text!r}") from None
    if not 1 <= value <= _MAX_JOBS:
        raise argparse.ArgumentTypeError(f"must be in [1, {_MAX_JOBS}], got {value}")
    return value


_MAX_JOBS = 4096


def add_sweep_command(commands: Any) -> None:
    """The ``sweep`` command: every cell of an experiment file's ``[sweep]`` grid as a run.

    ``commands`` is the root parser's subparsers action (argparse's type for it is private).
    """
    sweep = commands.add_parser(
        "sweep",
        help="run an experiment file's grid of runs and summarize it over seeds",
        description="Run every cell of the [sweep] grid of an experiment file as a full run "
        "under --out DIR (its own metrics log and checkpoints), --jobs at a time; finished "
        "cells are skipped and stopped ones resume. Then write DIR/summary.md, summary.csv "
        "and curves.png: one row per group of cells that differ only in seed.",
    )
    sweep.add_argument("experiment", nargs="?", metavar="FILE", help="the experiment file (TOML)")
    sweep.add_argument("--out", metavar="DIR", help="the sweep's directory (created if missing)")
    sweep.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="cells run at a time, each in its own process (default 1; with --ray-address "
        "every cell, as the cluster's CPUs allow); fewer start when their executors' workers "
        "would exceed this machine's CPUs",
    )
    sweep.add_argument(
        "--oversubscribe",
        action="store_true",
        help="start --jobs cells even when their workers exceed this machine's CPUs",
    )
    sweep.add_argument(
        "--ray-address",
        metavar="ADDR",
        type=_ray_address,
        help="run the cells as tasks on the Ray cluster at ADDR (host:port or auto; the 'ray' "
        "extra), each with the CPUs its executor keeps busy; --out must be on a filesystem "
        "every node shares",
    )
    sweep.add_argument(
        "--ray-node-ip",
        metavar="IP",
        type=_local_ip,
        help="with --ray-address: this machine's Ray node IP (e.g. a loopback address)",
    )
    sweep.add_argument(
        "--summarize",
        metavar="DIR",
        help="only rebuild DIR's summary from its cells' metrics logs (no FILE, no --out)",
    )
    sweep.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback before the one-line message",
    )


def _seconds(text: str) -> float:
    """A ``--timeout`` value: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _mirror_url(text: str) -> str:
    """A ``--mirror`` value: an http, https or file URL."""
    try:
        check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _checked(check: Callable[[str, str], str], name: str) -> Callable[[str], str]:
    """An argparse type from a validator ``check(name, value)``: its message, one line."""

    def parse(text: str) -> str:
        try:
            return check(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


# A sweep's ``--ray-address`` (``auto`` or ``[ray://]HOST:PORT``) and ``--ray-node-ip`` (an IP
# address of this machine: Ray waits minutes for another).
_ray_address = _checked(check_ray_address, "ray address")
_local_ip = _checked(check_local_ip, "ray node IP")


def add_data_command(commands: Any) -> None:
    """The ``data`` command: download a dataset into a directory, verified.

    ``commands`` is the root parser's subparsers action (argparse's type for it is private).
    """
    data = commands.add_parser(
        "data",
        help="download a dataset (verified, resumable)",
        description="Download MNIST, CIFAR-10 or CIFAR-100 into DIR, checked against pinned "
        "checksums; an interrupted download continues where it stopped, and files already "
        "there and verified are not downloaded again. Then: blazefl-fn run --dataset NAME "
        "--data-dir DIR.",
    )
    data.add_argument("dataset", choices=("mnist", "cifar10", "cifar100"))
    data.add_argument("directory", metavar="DIR", help="where the files go (created if missing)")
    data.add_argument(
        "--mirror",
        action="append",
        type=_mirror_url,
        metavar="URL",
        help="a base URL serving the dataset's files (http, https or file), instead of the "
        "default sources; repeat it to try several in order",
    )
    data.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for a server at each step (default 60)",
    )
    data.add_argument(
        "--quiet", action="store_true", help="no progress bar (drawn only on a terminal anyway)"
    )
    data.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback before the one-line message",
    )


def add_partition_flags(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """The flags that say how image datasets are split (``run`` and ``partition``)."""
    parser.add_argument(
        "--partition",
        choices=PARTITIONS,
        default=defaults.partition,
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


def flag_ranges() -> list[tuple[str, str]]:
    """``(flag, accepted values)`` for every numeric ``run`` flag, read from `RunConfig`'s
    validators (the docs print this table, so it cannot drift from the checks)."""
    rows = [("--checkpoint-every", ">= 1")]
    for field in attrs.fields(RunConfig):
        accepted = documented_range(field.validator)
        if accepted is not None:
            rows.append((f"--{field.name.replace('_', '-')}", accepted))
    return sorted(rows)
