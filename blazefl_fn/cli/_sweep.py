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
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol, cast

import attrs

from .._files import holding, lock_path, replaced_atomically
from ..run.checkpoint import checkpoint_file
from ..run.simulate import config_dict
from ._cells import STDERR, STDOUT, STOP_GRACE, Cluster, LocalCell, RayCell
from ._flags import UsageError
from ._signals import INTERRUPTED, PROG, TERMINATED, Terminated
from ._sweep_plan import Cell, fixed_settings, plan
from ._sweep_summary import METRICS, RESULT, write_summary

MANIFEST = "sweep.json"
_FORMAT = 1


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


def _result(directory: Path) -> dict[str, Any]:
    """A cell's recorded result (its ``--json`` output); empty when there is none to read."""
    try:
        result = json.loads((directory / RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cast(dict[str, Any], result) if isinstance(result, dict) else {}


def _finished(cell: Cell, directory: Path) -> bool:
    """Whether the cell's run ended with the settings it has now, up to how it was executed."""
    ran = _result(directory).get("config")
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
    rounds = _result(directory).get("rounds")
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


class _Launcher(Protocol):
    """A running cell, wherever it runs (`LocalCell`, `RayCell`)."""

    def poll(self) -> tuple[int, str] | None: ...
    def stop(self, signum: int) -> None: ...
    def wait_stopped(self, deadline: float) -> None: ...


@attrs.define
class _Running:
    cell: Cell
    launched: _Launcher
    started: float


def _argv(cell: Cell, directory: Path) -> list[str]:
    """The cell's ``python`` arguments: its run, writing its files under ``directory``."""
    checkpoint = directory / "checkpoint"
    resume = checkpoint_file(checkpoint).is_file()
    return [
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


def _start(cell: Cell, out: Path, cluster: Cluster | None) -> _Running:
    directory = out / cell.name
    directory.mkdir(exist_ok=True)
    # A result of other settings (rounds raised, say) no longer marks the cell finished.
    (directory / RESULT).unlink(missing_ok=True)
    argv = _argv(cell, directory)
    launched: _Launcher = (
        LocalCell(argv, directory)
        if cluster is None
        else RayCell(cluster, argv, directory, cell.cpus)
    )
    return _Running(cell, launched, time.perf_counter())


def _last_line(path: Path) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return "no message"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _collect(cell: Cell, status: int, why: str, out: Path) -> tuple[bool, str]:
    """Record a cell that ended: its result when it ended well; ``(ok, words for the line)``."""
    directory = out / cell.name
    output = directory / STDOUT
    try:
        if status != 0:
            return False, f"exit {status}: {why or _last_line(directory / STDERR)}"
        try:
            text = output.read_bytes().decode(errors="replace")
            result = json.loads(text)
        except (OSError, ValueError):
            return False, "its output is not a JSON result"
        with replaced_atomically(directory / RESULT, "cell result") as tmp:
            tmp.write_text(json.dumps(result) + "\n", encoding="utf-8")
        accuracy = result.get("accuracy")
        shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else "n/a"
        return True, f"accuracy {shown}  rounds {result.get('rounds')}"
    finally:
        with contextlib.suppress(OSError):
            output.unlink()


def _stop(running: Sequence[_Running], signum: int) -> None:
    """Stop the running cells as Ctrl-C stops a run (final checkpoint), then kill stragglers."""
    for r in running:
        r.launched.stop(signum)
    deadline = time.monotonic() + STOP_GRACE
    for r in running:
        r.launched.wait_stopped(deadline)


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


def _join(address: str, node_ip: str | None, planned: Sequence[Cell]) -> Cluster:
    """Join the cluster at ``address`` for ``planned``'s cells, or refuse cells it cannot run.

    Raises:
        UsageError: a cell of the Ray executor, or one wider than the cluster's largest node.
        ImportError, ConnectionError: no Ray, or no cluster answering there.
    """
    for cell in planned:
        if cell.config.executor == "ray":
            raise UsageError(
                f"cell {cell.label}: executor ray inside a Ray sweep; each cell already runs "
                "on a node of the cluster: give it executor sequential, threads or processes"
            )
    cluster = Cluster.join(address, node_ip)
    widest = cluster.widest_node()
    for cell in planned:
        if cell.cpus > widest:
            cluster.leave()
            raise UsageError(
                f"cell {cell.label} keeps {cell.cpus} CPUs busy; the largest node of the "
                f"cluster at {address} has {widest:g}"
            )
    return cluster


def _schedule(
    todo: Sequence[Cell],
    out: Path,
    jobs: int,
    budget: int | None,
    report: IO[str],
    done: int,
    cluster: Cluster | None = None,
) -> list[Cell]:
    """Run ``todo``, up to ``jobs`` at a time within ``budget`` CPUs (None: no limit), here or
    as tasks of ``cluster``; returns the cells that failed. Cells start in order; a cell larger
    than the budget runs alone."""
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
                running.append(_start(pending.pop(0), out, cluster))
                busy += running[-1].cell.cpus
            time.sleep(0.05)
            for r in list(running):
                ended = r.launched.poll()
                if ended is None:
                    continue
                running.remove(r)
                ok, words = _collect(r.cell, *ended, out)
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
    address: str | None = args.ray_address
    if address is None and args.ray_node_ip is not None:
        raise UsageError("--ray-node-ip applies to a Ray sweep: give --ray-address too")
    if address is not None and args.oversubscribe:
        raise UsageError(
            "--oversubscribe counts this machine's CPUs; with --ray-address Ray places the "
            "cells on the cluster's nodes by the CPUs each keeps busy"
        )
    planned, axes = plan(args.experiment)
    names = [c.name for c in planned]
    if len(set(names)) != len(names):
        raise UsageError(f"{args.experiment}: two cells resolve to the same settings")
    cpus = os.cpu_count() or 1
    budget = None if args.oversubscribe or address is not None else cpus
    jobs = args.jobs if args.jobs is not None else 1 if address is None else len(planned)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = sys.stdout
    with holding(out / MANIFEST, f"sweep {out}"):
        _check_rounds(planned, out)
        _claim(out, planned, axes)
        todo = [c for c in planned if not _finished(c, out / c.name)]
        done = len(planned) - len(todo)
        widest = max(c.cpus for c in planned)
        where = f"this machine's {cpus}" if address is None else f"the Ray cluster at {address}"
        print(
            f"sweep: {len(planned)} cells, {done} finished already; up to {jobs} at a time "
            f"(each up to {widest} CPU(s) of {where}) -> {out}",
            file=report,
            flush=True,
        )
        cluster = _join(address, args.ray_node_ip, todo) if address is not None and todo else None
        try:
            failed = _schedule(todo, out, jobs, budget, report, done, cluster)
        except KeyboardInterrupt as exc:
            status = TERMINATED if isinstance(exc, Terminated) else INTERRUPTED
            word = "terminated" if status == TERMINATED else "interrupted"
            print(
                f"{PROG}: {word}; stopped cells keep their checkpoints: run the same command "
                "again to continue the sweep",
                file=sys.stderr,
            )
            return status
        finally:
            if cluster is not None:
                cluster.leave()
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
