"""``blazefl-fn sweep``: every cell of an experiment file's grid as a full run, several at a
time in their own processes, resumable, then a summary over seeds.

Layout of ``--out DIR``: ``sweep.json`` (the cells, by name, and their settings), and per cell
``DIR/<cell>/`` with ``metrics.jsonl``, ``checkpoint/``, ``stderr.log`` (the run's messages)
and, once the run ended well, ``result.json`` (its ``--json`` output). A cell is named by a
hash of the settings that fix its bits (and of its axis values), so the same file names the
same cells, and a cell whose run was stopped resumes from its checkpoint to the same bits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, cast

import attrs

from .._files import holding, lock_path, replaced_atomically
from ..run.checkpoint import checkpoint_file
from ..run.config import RunConfig
from ..run.simulate import RESUMABLE_CHANGES, config_dict
from ._experiment_file import cells, read_experiment, resolve
from ._flags import UsageError
from ._signals import INTERRUPTED, PROG, TERMINATED, Terminated
from ._sweep_summary import METRICS, RESULT, write_summary

MANIFEST = "sweep.json"
_FORMAT = 1
# How long a stopped cell may take to write its final checkpoint before it is killed.
_STOP_GRACE = 60.0


@attrs.frozen
class Cell:
    """One run of a sweep.

    Attributes:
        name: its directory under ``--out``: a hash of its fixed settings and axis values.
        label: its axis values as ``name=value`` words.
        tokens: the ``run`` command line of its settings.
        config: the settings it resolves to.
        cpus: CPUs it keeps busy (its executor's local workers times their threads).
    """

    name: str
    label: str
    tokens: tuple[str, ...]
    config: RunConfig
    cpus: int


def fixed_settings(config: RunConfig) -> dict[str, Any]:
    """The settings of ``config`` that a resumed run may not change (they fix its bits)."""
    return {k: v for k, v in config_dict(config).items() if k not in RESUMABLE_CHANGES}


def cell_name(config: RunConfig, axes: Sequence[tuple[str, object]]) -> str:
    """A cell's directory name: 12 hex digits of the SHA-256 of its fixed settings and axis
    values (an axis over a resumable setting, e.g. ``executor``, still names its own cells)."""
    text = json.dumps({"fixed": fixed_settings(config), "axes": list(axes)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cpus(config: RunConfig) -> int:
    local = config.executor in ("threads", "processes") or (
        config.executor == "ray" and config.ray_address is None
    )
    return (config.workers if local else 1) * config.threads


def plan(path: str) -> tuple[list[Cell], list[str]]:
    """Every cell of the experiment file ``path``, each checked as ``run`` would check it, and
    the names of its axes.

    Raises:
        UnreadableExperiment: the file is missing or not TOML.
        UsageError: a bad key or value (the message names the cell when an axis value is bad).
    """
    experiment = read_experiment(path, sweep=True)
    if not experiment.axes:
        raise UsageError(f"{path} has no [sweep] table of axes; run one config with run --config")
    planned: list[Cell] = []
    for spec in cells(experiment):
        label = " ".join(f"{k}={v}" for k, v in spec.axes)
        try:
            args, config = resolve(spec.tokens)
        except (UsageError, ValueError, TypeError) as exc:
            raise UsageError(f"{path}: cell {label}: {exc}") from None
        if args.checkpoint_every < 1:
            raise UsageError(
                f"{path}: checkpoint-every must be an integer >= 1, got {args.checkpoint_every}"
            )
        name = cell_name(config, spec.axes)
        planned.append(Cell(name, label, spec.tokens, config, _cpus(config)))
    return planned, [name for name, _ in experiment.axes]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The fixed settings that differ between two sweeps' cells, e.g. ``lr 0.01 -> 0.1``
    (empty when both hold the same values, spread over other cells)."""

    def values(cells_: dict[str, Any]) -> dict[str, list[str]]:
        found: dict[str, set[str]] = {}
        for settings in cells_.values():
            for k, v in settings.items():
                found.setdefault(k, set()).add(json.dumps(v))
        return {k: sorted(v) for k, v in found.items()}

    before, after = values(old), values(new)
    changed = [
        f"{k} {'/'.join(before.get(k, ['-']))} -> {'/'.join(after.get(k, ['-']))}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]
    return ", ".join(changed)


def _claim(out: Path, planned: Sequence[Cell], axes: Sequence[str]) -> None:
    """Record the sweep's cells in ``out``, or refuse a directory that holds other ones."""
    manifest = out / MANIFEST
    cells_ = {c.name: fixed_settings(c.config) for c in planned}
    if manifest.is_file():
        try:
            stored = json.loads(manifest.read_text(encoding="utf-8"))["cells"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest}: not a sweep record ({exc})") from None
        if stored == cells_:
            return
        # Names are hashes of the settings: a file that still names every stored cell (more
        # seeds, another value on an axis) extends the sweep without touching a finished cell.
        dropped = [name for name in stored if cells_.get(name) != stored[name]]
        if dropped:
            differences = (
                _differences(stored, cells_) or f"{len(dropped)} of its cells are not in this file"
            )
            raise UsageError(
                f"{out} holds a sweep with other settings ({differences}); only resumable "
                "settings (rounds, executor, workers, ...) may change, and values may be added "
                "to an axis: choose another --out"
            )
    else:
        ours = lock_path(manifest.resolve()).name  # taken just before, by this sweep
        if any(p.name != ours for p in out.iterdir()):
            raise UsageError(
                f"{out} is not empty and holds no sweep ({MANIFEST}); choose another --out"
            )
    with replaced_atomically(manifest, "sweep record") as tmp:
        record = {"format": _FORMAT, "axes": list(axes), "cells": cells_}
        tmp.write_text(json.dumps(record, indent=1) + "\n")


# How a run is executed, never what it computes: a finished cell stays finished when only these
# change (the per-client executors give the same bits; vectorized rounds differently).
_EXECUTION_ONLY = frozenset(
    {
        "executor",
        "workers",
        "ray_address",
        "ray_node_ip",
        "client_timeout",
        "client_state_memory_mb",
        "client_state_dir",
    }
)


def _finished(cell: Cell, directory: Path) -> bool:
    """Whether the cell's run ended with the settings it has now, up to how it was executed."""
    try:
        result = json.loads((directory / RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(result, dict):
        return False
    ran = cast(dict[str, Any], result).get("config")
    now = config_dict(cell.config)
    if not isinstance(ran, dict):
        return False
    ran = cast(dict[str, Any], ran)
    if "vectorized" in (ran.get("executor"), now["executor"]):
        return ran == now
    return {k: v for k, v in ran.items() if k not in _EXECUTION_ONLY} == {
        k: v for k, v in now.items() if k not in _EXECUTION_ONLY
    }


def _rounds_run(directory: Path) -> int:
    """The rounds a cell's last finished run completed (0 without a result)."""
    try:
        result = json.loads((directory / RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    rounds = cast(dict[str, Any], result).get("rounds") if isinstance(result, dict) else None
    return rounds if isinstance(rounds, int) else 0


def _check_rounds(planned: Sequence[Cell], out: Path) -> None:
    """Refuse, before any cell starts, a ``rounds`` below what a finished cell already ran: its
    checkpoint cannot go back."""
    for cell in planned:
        ran = _rounds_run(out / cell.name)
        if ran > cell.config.rounds:
            raise UsageError(
                f"{out}: cell {cell.label} ({cell.name}) already ran {ran} rounds, more than "
                f"rounds={cell.config.rounds}; rounds may only be raised: choose another --out"
            )


def _death_signal() -> Callable[[], None] | None:
    """On Linux, what a cell's process runs before it starts: a sweep killed outright
    (SIGKILL) then leaves no cell running on its own, and SIGTERM lets the cell write its final
    checkpoint, as a stopped run does. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        # Looked up here, in the sweep: between fork and exec the child may not import.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    term = int(signal.SIGTERM)

    def set_death_signal() -> None:  # pragma: no cover - runs in the child
        prctl(1, term)  # PR_SET_PDEATHSIG

    return set_death_signal


@attrs.define
class _Running:
    cell: Cell
    process: subprocess.Popen[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]
    started: float


def _start(cell: Cell, out: Path) -> _Running:
    directory = out / cell.name
    directory.mkdir(exist_ok=True)
    checkpoint = directory / "checkpoint"
    # A result of other settings (rounds raised, say) no longer marks the cell finished.
    (directory / RESULT).unlink(missing_ok=True)
    resume = checkpoint_file(checkpoint).is_file()
    argv = [
        sys.executable,
        "-m",
        "blazefl_fn",
        "run",
        *cell.tokens,
        f"--metrics={directory / METRICS}",
        f"--checkpoint-dir={checkpoint}",
        # No checkpoint yet: a log of a run killed before its first checkpoint is replaced.
        f"--resume={checkpoint}" if resume else "--overwrite",
        "--json",
        "--quiet",
    ]
    stdout = open(directory / ".stdout", "w+b")  # noqa: SIM115  # closed in _collect
    stderr = open(directory / "stderr.log", "a+b")  # noqa: SIM115  # every attempt's messages
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=_death_signal(),  # the sweep itself starts no threads
        )
    except BaseException:
        stdout.close()
        stderr.close()
        raise
    return _Running(cell, process, stdout, stderr, time.perf_counter())


def _last_line(stream: IO[bytes]) -> str:
    stream.seek(0)
    lines = [ln.strip() for ln in stream.read().decode(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else "no message"


def _collect(running: _Running, out: Path) -> tuple[bool, str]:
    """Record a cell that exited: its result when it ended well; ``(ok, words for the line)``."""
    directory = out / running.cell.name
    status = running.process.returncode
    try:
        running.stdout.seek(0)
        text = running.stdout.read().decode(errors="replace")
        if status != 0:
            return False, f"exit {status}: {_last_line(running.stderr)}"
        try:
            result = json.loads(text)
        except ValueError:
            return False, f"its output is not a JSON result: {text[:200]!r}"
        with replaced_atomically(directory / RESULT, "cell result") as tmp:
            tmp.write_text(json.dumps(result) + "\n", encoding="utf-8")
        accuracy = result.get("accuracy")
        shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else "n/a"
        return True, f"accuracy {shown}  rounds {result.get('rounds')}"
    finally:
        running.stdout.close()
        running.stderr.close()
        with contextlib.suppress(OSError):
            (directory / ".stdout").unlink()


def _stop(running: Sequence[_Running], signum: int) -> None:
    """Stop the running cells as Ctrl-C stops a run (final checkpoint), then kill stragglers."""
    for r in running:
        with contextlib.suppress(OSError):
            r.process.send_signal(signum)
    deadline = time.monotonic() + _STOP_GRACE
    for r in running:
        try:
            r.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.process.kill()
            r.process.wait()
        r.stdout.close()
        r.stderr.close()


class _Report:
    """The sweep's progress: a line per finished cell, under an overall bar of cells when
    ``out`` is a terminal and tqdm is installed."""

    def __init__(self, out: IO[str], total: int, done: int) -> None:
        self.out = out
        self._bar: Any = None
        if out.isatty() and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            size = shutil.get_terminal_size()  # a 0x0 terminal would hide the bar
            self._bar = tqdm(
                total=total,
                initial=done,
                unit="cell",
                file=out,
                leave=False,
                ncols=size.columns,
                nrows=size.lines,
            )

    def line(self, text: str) -> None:
        """Print ``text`` (above the bar) and count one more finished cell."""
        if self._bar is None:
            print(text, file=self.out, flush=True)
            return
        self._bar.write(text, file=self.out)
        self._bar.update(1)

    def close(self) -> None:
        """Take the bar off the terminal (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _schedule(
    todo: Sequence[Cell], out: Path, jobs: int, budget: int | None, report: IO[str], done: int
) -> list[Cell]:
    """Run ``todo``, up to ``jobs`` at a time within ``budget`` CPUs (None: no limit); returns
    the cells that failed. Cells start in order; a cell larger than the budget runs alone."""
    total = done + len(todo)
    pending = list(todo)
    running: list[_Running] = []
    failed: list[Cell] = []
    progress = _Report(report, total, done)
    try:
        while pending or running:
            busy = sum(r.cell.cpus for r in running)
            while (
                pending
                and len(running) < jobs
                and (not running or budget is None or busy + pending[0].cpus <= budget)
            ):
                running.append(_start(pending.pop(0), out))
                busy += running[-1].cell.cpus
            time.sleep(0.05)
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                ok, words = _collect(r, out)
                done += 1
                seconds = time.perf_counter() - r.started
                state = "done" if ok else "FAILED"
                progress.line(
                    f"[{done}/{total}] {state}  {r.cell.label}  {words}  {seconds:.1f}s  "
                    f"({r.cell.name})"
                )
                if not ok:
                    failed.append(r.cell)
    except KeyboardInterrupt as exc:
        progress.close()
        _stop(running, signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
        raise
    finally:
        progress.close()
    return failed


def sweep_command(args: argparse.Namespace) -> int:
    """``blazefl-fn sweep``: run the file's cells under ``--out``, or ``--summarize`` a
    directory; returns the exit status.

    Raises:
        UsageError: bad flags, a bad experiment file, or an ``--out`` of other settings.
        UnreadableExperiment: the file is missing or not TOML.
        OSError, ValueError: a file under the directory could not be read or written.
    """
    if args.summarize is not None:
        if args.experiment is not None or args.out is not None:
            raise UsageError("--summarize DIR takes no experiment file and no --out")
        return _summarize(Path(args.summarize), sys.stdout)
    if args.experiment is None or args.out is None:
        raise UsageError("sweep needs an experiment file and --out DIR (or --summarize DIR)")
    planned, axes = plan(args.experiment)
    names = [c.name for c in planned]
    if len(set(names)) != len(names):
        raise UsageError(f"{args.experiment}: two cells resolve to the same settings")
    cpus = os.cpu_count() or 1
    budget = None if args.oversubscribe else cpus
    jobs = args.jobs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = sys.stdout
    with holding(out / MANIFEST, f"sweep {out}"):
        _check_rounds(planned, out)
        _claim(out, planned, axes)
        todo = [c for c in planned if not _finished(c, out / c.name)]
        done = len(planned) - len(todo)
        widest = max(c.cpus for c in planned)
        print(
            f"sweep: {len(planned)} cells, {done} finished already; up to {jobs} at a time "
            f"(each up to {widest} CPU(s) of this machine's {cpus}) -> {out}",
            file=report,
            flush=True,
        )
        try:
            failed = _schedule(todo, out, jobs, budget, report, done)
        except KeyboardInterrupt as exc:
            status = TERMINATED if isinstance(exc, Terminated) else INTERRUPTED
            word = "terminated" if status == TERMINATED else "interrupted"
            print(
                f"{PROG}: {word}; stopped cells keep their checkpoints: run the same command "
                "again to continue the sweep",
                file=sys.stderr,
            )
            return status
        _summarize(out, report)
    if failed:
        print(
            f"{PROG}: error: {len(failed)} of {len(planned)} cells failed: "
            + ", ".join(f"{c.label} ({out / c.name / 'stderr.log'})" for c in failed),
            file=sys.stderr,
        )
        return 3
    return 0


def _summarize(out: Path, report: IO[str]) -> int:
    manifest = out / MANIFEST
    try:
        axes = json.loads(manifest.read_text(encoding="utf-8"))["axes"]
    except FileNotFoundError:
        raise ValueError(f"{out} is not a sweep directory (no {MANIFEST})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{manifest}: not a sweep record ({exc})") from None
    rows, written = write_summary(out, axes)
    print(f"summary of {sum(len(r.seeds) for r in rows)} finished cells in {len(rows)} groups: "
          + ", ".join(str(p) for p in written), file=report, flush=True)  # fmt: skip
    if not any(p.suffix == ".png" for p in written):
        print(
            "curves.png not drawn: matplotlib is not installed (pip install 'blazefl_fn[plot]')",
            file=report,
            flush=True,
        )
    return 0
