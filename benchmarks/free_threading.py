"""Thread scaling with and without the GIL: blazefl_fn's `Threads` against the bare thread floor.

W1 (100 clients x 500, 1 epoch, 3 rounds) and W0 (1000 clients x 50, one step, 1 round) of
`benchmarks.compare` (the small CNN on CIFAR-shaped data, torch intra-op threads 1), each run by
two runners in ``threads`` mode at P = 1 and 2:

- ``bare``: a plain ``ThreadPoolExecutor`` over the bare PyTorch client update, the floor;
- ``blazefl_fn``: `blazefl_fn.Threads(P)` with `make_round` / `run_rounds`;

under three interpreters:

- ``3.11``: the project's ``.venv`` (CPython 3.11 with the GIL, torch 2.13.0 CPU build);
- ``ft``: ``.venv-ft`` (`make ft-env`: free-threaded CPython with the GIL off, its torch);
- ``ft+GIL``: the same ``.venv-ft`` with ``PYTHON_GIL=1``: same interpreter, same torch, GIL on;
  the control that separates free-threading from the interpreter and torch versions.

Each case runs in a fresh process (``benchmarks.compare``'s runners), ``--repeats`` passes,
interleaved; the table gives median round-loop seconds. ``ft / 3.11`` and ``ft / ft+GIL`` are
ratios of medians (below 1: faster without the GIL); ``P2 speed-up`` is P = 1 over P = 2 within
one interpreter; ``fn / bare`` is our overhead over the floor. Digests must agree across P,
repeats and GIL on/off for one runner and interpreter (torch versions may differ between
interpreters).

    python -m benchmarks.free_threading               # W1 and W0, 3 repeats (~30 min, 2 cores)
    python -m benchmarks.free_threading --quick       # small W1 and W0, 1 repeat
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .compare.data import write_dataset
from .compare.execute import REPO_ROOT, run_case
from .compare.spec import Case, Workload
from .compare.workloads import DEFAULT, QUICK

RUNNERS = ("bare", "blazefl_fn")
PARALLELISM = (1, 2)
# Imports what the runners import, then reports whether the GIL is on.
_PROBE = (
    "import sys, sysconfig, numpy, torch, blazefl_fn; "
    "import benchmarks.compare.runners.bare, benchmarks.compare.runners.fn; "
    "ft = sysconfig.get_config_var('Py_GIL_DISABLED') == 1; "
    "gil = sys._is_gil_enabled() if hasattr(sys, '_is_gil_enabled') else True; "
    "print(f\"{sys.version.split()[0]}{'t' if ft else ''}|{torch.__version__}|{gil}\")"
)


@dataclasses.dataclass(frozen=True)
class Interpreter:
    """One column: a Python and the environment it runs the runners with."""

    name: str
    python: Path
    env: dict[str, str]
    version: str = ""
    torch: str = ""
    gil: bool = True

    def probed(self) -> Interpreter:
        """This interpreter with its version, torch and GIL state read from a fresh process.

        Raises:
            SystemExit: the interpreter is missing or cannot import the runners.
        """
        if not self.python.exists():
            raise SystemExit(f"free_threading: no interpreter at {self.python} (make ft-env?)")
        done = subprocess.run(
            [str(self.python), "-c", _PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **self.env}, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"free_threading: {self.python} failed: {done.stderr.strip()[-500:]}")
        version, torch, gil = done.stdout.strip().splitlines()[-1].split("|")
        return dataclasses.replace(self, version=version, torch=torch, gil=gil == "True")


@dataclasses.dataclass(frozen=True)
class Cell:
    """Median loop seconds of one (workload, runner, P, interpreter), and its digests."""

    seconds: float
    digests: frozenset[str]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Thread scaling with and without the GIL.")
    parser.add_argument("--repeats", type=int, help="passes over every case (3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small W1 and W0 (a smoke run)")
    parser.add_argument("--workloads", default="W1,W0", help="from W1, W0")
    parser.add_argument("--python", type=Path, default=REPO_ROOT / ".venv" / "bin" / "python",
                        help="the interpreter with the GIL (default .venv)")  # fmt: skip
    parser.add_argument("--ft-python", type=Path,
                        default=REPO_ROOT / ".venv-ft" / "bin" / "python",
                        help="the free-threaded interpreter (default .venv-ft)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    return parser


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def print_table(
    cells: dict[tuple[str, str, int, str], Cell],
    workloads: Sequence[Workload],
    interpreters: Sequence[Interpreter],
) -> bool:
    """Print the table; return whether digests agree where they must."""
    names = [i.name for i in interpreters]
    head = [
        "workload", "runner", "P", *(f"{n} s" for n in names), "ft / 3.11", "ft / ft+GIL",
        *(f"P2 speed-up {n}" for n in names), *(f"fn / bare {n}" for n in names),
    ]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    agree = True
    for work in workloads:
        for runner in RUNNERS:
            for p in PARALLELISM:
                row = [work.name, runner, str(p)]
                secs = {n: cells[work.name, runner, p, n].seconds for n in names}
                row += [f"{secs[n]:.2f}" for n in names]
                row += [_ratio(secs["ft"], secs["3.11"]), _ratio(secs["ft"], secs["ft+GIL"])]
                row += [
                    _ratio(cells[work.name, runner, 1, n].seconds, secs[n]) if p == 2 else "-"
                    for n in names
                ]
                row += [
                    _ratio(secs[n], cells[work.name, "bare", p, n].seconds)
                    if runner == "blazefl_fn"
                    else "-"
                    for n in names
                ]
                print("| " + " | ".join(row) + " |")
    print()
    for work in workloads:
        for runner in RUNNERS:
            for group in (("3.11",), ("ft", "ft+GIL")):
                found = frozenset().union(
                    *(cells[work.name, runner, p, n].digests for p in PARALLELISM for n in group)
                )
                ok = len(found) == 1
                agree &= ok
                print(f"{work.name} {runner} on {'/'.join(group)}: "
                      f"{'one digest' if ok else 'DIGESTS DIFFER'} "
                      f"({', '.join(sorted(d[:12] for d in found))})")  # fmt: skip
    return agree


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Each column sets its own GIL mode; one from the caller's shell would leak into all three.
    os.environ.pop("PYTHON_GIL", None)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        raise SystemExit(f"free_threading: --repeats must be >= 1, got {args.repeats}")
    source = QUICK if args.quick else DEFAULT
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in ("W1", "W0")]
    if unknown or not chosen:
        raise SystemExit(f"free_threading: --workloads takes W1 and/or W0, got {args.workloads!r}")
    workloads = [dataclasses.replace(source[w], parallelism=PARALLELISM) for w in chosen]
    interpreters = [
        Interpreter("3.11", args.python, {}).probed(),
        Interpreter("ft", args.ft_python, {}).probed(),
        Interpreter("ft+GIL", args.ft_python, {"PYTHON_GIL": "1"}).probed(),
    ]
    if interpreters[1].gil or not interpreters[2].gil:
        raise SystemExit(
            f"free_threading: {args.ft_python} must run with the GIL off, and on under "
            f"PYTHON_GIL=1 (got {interpreters[1].gil} and {interpreters[2].gil}): is it a "
            "free-threaded build whose imports keep the GIL off (tools/ft_check.py)?"
        )
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the start; "
          f"{args.repeats} repeats; torch intra-op threads 1")  # fmt: skip
    for i in interpreters:
        print(f"- {i.name}: {i.python} (Python {i.version}, torch {i.torch}, GIL on: {i.gil})")
    print()
    times: dict[tuple[str, str, int, str], list[float]] = {}
    digests: dict[tuple[str, str, int, str], set[str]] = {}
    with tempfile.TemporaryDirectory(prefix="blazefl-ft-") as tmp:
        root = Path(tmp)
        dirs = {w.name: root / w.data_id for w in workloads}
        for w in workloads:
            write_dataset(w, dirs[w.name])
        for repeat in range(args.repeats):
            for w in workloads:
                for runner in RUNNERS:
                    for p in PARALLELISM:
                        for interp in interpreters:
                            case = Case(w, runner, "threads", p, 1, str(dirs[w.name]))
                            log = root / "logs" / f"{w.name}-{runner}-{p}-{interp.name}.log"
                            run = run_case(case, interp.python, log, args.timeout, interp.env)
                            gil = run.result.notes.get("gil") if run.result else None
                            if run.result is not None and gil not in (None, interp.gil):
                                print(f"{w.name} {runner} P={p} {interp.name}: the GIL was "
                                      f"{'on' if gil else 'off'} in the runner")  # fmt: skip
                                return 1
                            if run.result is None:
                                print(f"{w.name} {runner} P={p} {interp.name}: {run.error}")
                                print(log.read_text()[-2000:], file=sys.stderr)
                                return 1
                            key = (w.name, runner, p, interp.name)
                            times.setdefault(key, []).append(run.loop)
                            digests.setdefault(key, set()).add(run.result.digest)
            print(f"pass {repeat + 1}/{args.repeats} done, load {os.getloadavg()[0]:.2f}",
                  flush=True)  # fmt: skip
    cells = {k: Cell(statistics.median(v), frozenset(digests[k])) for k, v in sorted(times.items())}
    print()
    agree = print_table(cells, workloads, interpreters)
    print(f"\nload {os.getloadavg()[0]:.2f} at the end")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
