"""The ``blazefl-fn`` command's machinery: parsing, the commands, errors as one line each."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import attrs

from .. import portable
from .._files import holding
from .._validators import check_local_ip
from ..data.cifar import download_cifar10, download_cifar100
from ..data.mnist import MNIST_MIRRORS, download_mnist
from ..data.partition import partition_report
from ..keys import Key
from ..records import ServerState
from ..run.checkpoint import checkpoint_file, read_config
from ..run.config import RunConfig
from ..run.loop import Callback
from ..run.metrics_log import MetricsLog
from ..run.plot import plot_runs
from ..run.progress import progress_callback
from ..run.simulate import config_dict, config_from_dict, load_central, simulate, split
from ._experiment_file import UnreadableExperiment, read_experiment, tokens
from ._flags import OVERSUBSCRIPTION, PROG, UsageError, build_parser
from ._signals import INTERRUPTED, TERMINATED, Terminated, release_import_guard, while_running
from ._sweep import sweep_command

__all__ = ["main"]

DEBUG_ENV = "BLAZEFL_FN_DEBUG"
# Exit statuses (see the module docstring).
_DATA, _USAGE, _RUN = 1, 2, 3


def _stopped(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What a Ctrl-C or a SIGTERM is called, and its exit status."""
    if isinstance(exc, Terminated):
        return "terminated", TERMINATED
    return "interrupted", INTERRUPTED


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


_CONFIG_FIELDS = tuple(f.name for f in attrs.fields(RunConfig))


def _config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(**{name: getattr(args, name) for name in _CONFIG_FIELDS})


class _DataError(Exception):
    """A missing or unreadable file met while reading the command line (exit status 1)."""


class _RunFailed(Exception):
    """A ValueError raised after the round loop began: the run failed (exit status 3), it is
    not a bad file (the data and checkpoint were read before the loop)."""


class _LoopStarted(Callback):
    """Records that the round loop began (so a later ValueError is the run's, not a file's)."""

    def __init__(self) -> None:
        self.began = False

    def on_begin(self, state: ServerState, rounds: int) -> None:
        self.began = True


def _stored_config(resume: str) -> RunConfig:
    try:
        return config_from_dict(read_config(resume))
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise _DataError from exc


def _resumed_config(argv: Sequence[str] | None, stored: RunConfig) -> RunConfig:
    """The checkpoint's config with the flags given on the command line applied over it."""
    given = vars(build_parser(only_given=True).parse_args(argv))
    changes = {k: v for k, v in given.items() if k in _CONFIG_FIELDS}
    executor = changes.get("executor", stored.executor)
    # Settings that belonged to the executor the run leaves, unless given again.
    leaving = {
        "client_timeout": executor not in ("processes", "ray"),
        "ray_address": executor != "ray",
        "ray_node_ip": executor != "ray",
    }
    for field, left in leaving.items():
        if left and field not in changes:
            changes[field] = None
    return attrs.evolve(stored, **changes)


def _check_machine(args: argparse.Namespace, config: RunConfig) -> None:
    """Refuse settings this machine cannot carry: too many local workers."""
    local = config.executor in ("threads", "processes") or (
        config.executor == "ray" and config.ray_address is None
    )
    if config.ray_node_ip is not None:
        # Ray waits minutes for an address this machine does not have: refuse it now.
        try:
            check_local_ip("ray_node_ip", config.ray_node_ip)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    cpus = os.cpu_count() or 1
    if local and config.workers > OVERSUBSCRIPTION * cpus and not args.oversubscribe:
        raise UsageError(
            f"--workers {config.workers} is more than {OVERSUBSCRIPTION}x this machine's "
            f"{cpus} CPUs; pass --oversubscribe to run that many anyway"
        )


def _checkpoint_stamp(directory: str | None) -> tuple[int, int, int] | None:
    """Identity of the checkpoint file in ``directory`` (None: there is none)."""
    if directory is None:
        return None
    try:
        info = checkpoint_file(directory).stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _metrics_log(
    args: argparse.Namespace, config: RunConfig, stack: contextlib.ExitStack
) -> MetricsLog | None:
    """The ``--metrics`` log, locked for this run; a fresh run refuses to replace records."""
    if args.metrics is None:
        return None
    stack.enter_context(holding(args.metrics, f"metrics log {args.metrics}"))
    path = Path(args.metrics)
    if args.resume is None and not args.overwrite and path.is_file() and path.stat().st_size:
        raise FileExistsError(
            f"metrics log {args.metrics} already holds records; continue its run (--resume) or "
            "replace it (--overwrite)"
        )
    return MetricsLog(path, portable.numerics(), config_dict(config))


def _run(args: argparse.Namespace, config: RunConfig) -> int:
    started = _LoopStarted()
    try:
        with contextlib.ExitStack() as stack:
            progress = sys.stderr if args.json else sys.stdout
            callbacks: list[Callback] = [progress_callback(progress, quiet=args.quiet)]
            log = _metrics_log(args, config, stack)
            if log is not None:
                callbacks.append(log)
                stack.callback(log.close)
            # Last: a malformed metrics log found by the log's own on_begin is a file's error.
            callbacks.append(started)
            return _run_locked(args, config, callbacks)
    except ValueError as exc:
        if started.began:
            raise _RunFailed from exc
        raise


def _run_locked(args: argparse.Namespace, config: RunConfig, callbacks: list[Callback]) -> int:
    checkpoint_dir = args.checkpoint_dir if args.checkpoint_dir is not None else args.resume
    before = _checkpoint_stamp(checkpoint_dir)
    try:
        result = simulate(
            config,
            callbacks,
            resume=args.resume,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            overwrite=args.overwrite,
        )
    except KeyboardInterrupt as exc:
        word, status = _stopped(exc)
        after = _checkpoint_stamp(checkpoint_dir)
        if checkpoint_dir is None:
            saved = "nothing was saved (no --checkpoint-dir)"
        elif after is not None and after != before:
            saved = (
                f"checkpoint of the last completed round saved in {checkpoint_dir} "
                f"(continue with --resume {checkpoint_dir})"
            )
        elif after is not None:
            saved = f"no round completed; the checkpoint in {checkpoint_dir} is unchanged"
        else:
            saved = "no round completed, so no checkpoint was saved"
        print(f"{PROG}: {word}; {saved}", file=sys.stderr)
        return status
    summary = {
        "algorithm": config.algorithm,
        "dataset": config.dataset,
        "rounds": result.state.round,
        "stopped_early": result.stopped_early,
        "clients": config.clients,
        "clients_per_round": config.clients_per_round,
        "seed": config.seed,
        "partition": config.partition,
        "executor": config.executor,
        "workers": config.workers,
        "chunk": config.chunk,
        "ray_address": config.ray_address,
        "device": config.device,
        "server_device": config.server_device,
        **result.numerics,
        "accuracy": result.accuracy,
        "metrics": dict(result.metrics),
        "loss": result.loss,
        "params_sha256": result.params_sha256,
        "client_state_sha256": result.client_state_sha256,
        "wall_seconds": round(result.wall_seconds, 3),
        "bytes_up": sum(r.bytes_up for r in result.reports),
        "bytes_down": sum(r.bytes_down for r in result.reports),
        "skipped_clients": sum(len(r.skipped) for r in result.reports),
        "privacy": None if result.privacy is None else dict(result.privacy),
        "stop_reason": result.stop_reason,
        # Every setting the run resolved (after --resume, the checkpoint's with the flags given
        # over it): a results file traces back to the run that made it.
        "config": config_dict(config),
    }
    if args.json:
        # Strict JSON: a NaN or an infinity (e.g. the loss of an empty test set) is null.
        print(json.dumps(json_safe(summary), allow_nan=False))
    else:
        if result.stop_reason is not None:
            print(f"privacy budget: {result.stop_reason}")
        spent = "" if result.privacy is None else f"  epsilon {result.privacy['epsilon']:.4g}"
        print(
            f"final accuracy {result.accuracy:.4f}  loss {result.loss:.4f}{spent}"
            f"  params_sha256 {result.params_sha256}  wall {result.wall_seconds:.1f}s"
        )
    return 0


def json_safe(value: object) -> object:
    """``value`` with every non-finite float replaced by None, for strict JSON.

    Examples:
        >>> json_safe({"loss": float("nan"), "xs": [1.0, float("inf")], "n": 3})
        {'loss': None, 'xs': [1.0, None], 'n': 3}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in cast(dict[object, object], value).items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in cast(Sequence[object], value)]
    return value


def _plot(args: argparse.Namespace) -> int:
    labels = None if args.labels is None else args.labels.split(",")
    out = plot_runs(args.logs, args.output, labels)
    print(f"wrote {out}")
    return 0


def _data(args: argparse.Namespace) -> int:
    """``blazefl-fn data NAME DIR``: download a dataset, verified, and say how to use it."""
    progress = not args.quiet
    mirrors: tuple[str, ...] | None = None if args.mirror is None else tuple(args.mirror)
    try:
        if args.dataset == "mnist":
            root = download_mnist(
                args.directory,
                mirrors=MNIST_MIRRORS if mirrors is None else mirrors,
                timeout=args.timeout,
                progress=progress,
            )
        else:
            fetch = download_cifar10 if args.dataset == "cifar10" else download_cifar100
            root = fetch(args.directory, mirrors=mirrors, timeout=args.timeout, progress=progress)
    except KeyboardInterrupt as exc:
        word, status = _stopped(exc)
        print(
            f"{PROG}: {word}; the partial download is kept, hidden, in {args.directory}: "
            "run the same command again to continue it",
            file=sys.stderr,
        )
        return status
    print(
        f"{args.dataset} is ready in {root}; use it with: "
        f"{PROG} run --dataset {args.dataset} --data-dir {root}"
    )
    return 0


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a worker's message may span several)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def _fail(exc: BaseException, status: int, debug: bool, *, internal: bool = False) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    text = _one_line(exc)
    if internal:
        text = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (see the module docstring).

    With ``argv=None`` it is the process's command line (``sys.argv``): ``run --portable``
    then starts the process again with the portable pins (`os.execve`) when they are missing.
    Given an ``argv`` list, it pins this process instead, refusing if a kernel already ran.
    """
    release_import_guard()
    with while_running() as running:
        status = _main(argv)
        # A Ctrl-C caught elsewhere (a pool holding it while workers start) stopped it too.
        running.stopped = status in (INTERRUPTED, TERMINATED)
        return status


def _with_experiment(argv: Sequence[str], path: str) -> list[str]:
    """``argv`` (``run ...``) with the experiment file's settings as flags before the given
    ones, which override them (argparse keeps an option's last value)."""
    experiment = read_experiment(path, sweep=False)
    try:
        settings = tokens(experiment.settings)
        build_parser().parse_args(["run", *settings])
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return [argv[0], *settings, *argv[1:]]


def _sweep(args: argparse.Namespace, debug: bool) -> int:
    try:
        return sweep_command(args)
    except UsageError as exc:
        return _fail(exc, _USAGE, debug)
    except (UnreadableExperiment, OSError, ValueError, ImportError) as exc:
        # ImportError: --ray-address without the ray extra (ConnectionError is an OSError).
        return _fail(exc, _DATA, debug)
    except Exception as exc:
        return _fail(exc, _RUN, debug, internal=True)


def _main(argv: Sequence[str] | None) -> int:
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        debug = debug or bool(getattr(args, "debug", False))
        if args.command == "sweep":
            return _sweep(args, debug)
        given = argv
        if args.command == "run" and args.config is not None:
            # ``argv`` itself stays as it was: None (the process's own) restarts for --portable.
            given = _with_experiment(sys.argv[1:] if argv is None else argv, args.config)
            args = build_parser().parse_args(given)
        if args.command == "run":
            if args.checkpoint_every < 1:
                raise ValueError(
                    f"checkpoint-every must be an integer >= 1, got {args.checkpoint_every}"
                )
            if args.resume is None:
                config = _config(args)
            else:
                config = _resumed_config(given, _stored_config(args.resume))
            _check_machine(args, config)
        else:
            config = _partition_config(args) if args.command == "partition" else RunConfig()
    except (UsageError, ValueError, TypeError) as exc:
        return _fail(exc, _USAGE, debug)
    except _DataError as exc:
        return _fail(exc.__cause__ or exc, _DATA, debug)
    except UnreadableExperiment as exc:
        return _fail(exc, _DATA, debug)
    if args.command == "run" and config.portable and not portable.pinned():
        if argv is None:
            # The process's own command line: the kernel libraries read their pins once, at
            # their first kernel, so start afresh (same PID, same command and interpreter
            # flags) with the pins in the environment, whatever it held for them.
            try:
                os.execve(sys.executable, sys.orig_argv, portable.with_pins(os.environ))
            except OSError as exc:
                # E2BIG: the environment is at the kernel's limit, and the pins do not fit.
                reason = exc.strerror or str(exc)
                return _fail(
                    UsageError(
                        f"--portable restarts the command with its pins in the environment, "
                        f"which failed ({reason}); shrink the environment, or set "
                        f"{' '.join(f'{k}={v}' for k, v in portable.PINS.items())} yourself"
                    ),
                    _USAGE,
                    debug,
                )
        try:
            portable.enable()  # called in-process: refused if a kernel already ran
        except RuntimeError as exc:
            return _fail(exc, _USAGE, debug)
    try:
        if args.command == "plot":
            return _plot(args)
        if args.command == "data":
            return _data(args)
        return _run(args, config) if args.command == "run" else _partition(args, config)
    except _RunFailed as exc:
        return _fail(exc.__cause__ or exc, _RUN, debug)
    except (ValueError, OSError, ImportError) as exc:
        # Bad or missing files: the loaders' messages name the file and the problem.
        return _fail(exc, _DATA, debug)
    except KeyboardInterrupt as exc:
        word, status = _stopped(exc)
        print(f"{PROG}: {word}", file=sys.stderr)
        return status
    except RuntimeError as exc:
        # ClientError, WorkerError, NonFiniteError, GlobalRNGError: their messages name the
        # client, round and cause.
        return _fail(exc, _RUN, debug)
    except Exception as exc:
        return _fail(exc, _RUN, debug, internal=True)
