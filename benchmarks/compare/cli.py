"""``python -m benchmarks.compare``: plan the cases, run them, write JSON, markdown and a chart.

    python -m benchmarks.compare                 # everything (~38 min on 2 cores)
    python -m benchmarks.compare --quick         # small sizes, P = 2, 2 repeats (a few minutes)
    python -m benchmarks.compare --only W1,blazefl_fn,flower --repeats 5
    python -m benchmarks.compare --set W1.rounds=5 --set '*.lr=0.05' --parallelism 2
    python -m benchmarks.compare --wait-load 0.6      # on a shared machine: start when idle

``--only`` takes workload names (W1, W1-e5, W1-resnet18, W0), frameworks (bare, blazefl_fn,
flower, blazefl) and ``framework:mode`` tokens; each kind given narrows the selection. At
P = 1 the bare loop and blazefl_fn run ``sequential`` only, unless a mode is named.
``blazefl_fn:ray`` (the Ray executor) runs only when named, e.g.
``--only W1,W0,bare,blazefl_fn:ray,flower``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import envs, report
from .execute import REPO_ROOT, Run, imported_elsewhere, run_case
from .spec import FRAMEWORKS, MODES, ON_REQUEST, Case, Workload
from .workloads import DEFAULT, QUICK, override

__all__ = ["main", "plan"]

PEER_ENV = {"flower": "flower", "blazefl": "blazefl"}


@dataclasses.dataclass(frozen=True)
class Selection:
    """What ``--only`` keeps (empty sets keep everything of that kind)."""

    workloads: frozenset[str] = frozenset()
    frameworks: frozenset[str] = frozenset()
    modes: frozenset[str] = frozenset()  # "framework:mode"


def parse_only(text: str | None, workloads: Sequence[str]) -> Selection:
    """Parse ``--only``.

    Raises:
        ValueError: an unknown token.
    """
    if not text:
        return Selection()
    names, frameworks, modes = set[str](), set[str](), set[str]()
    for token in (t.strip() for t in text.split(",") if t.strip()):
        framework, _, mode = token.partition(":")
        if token in workloads:
            names.add(token)
        elif framework in FRAMEWORKS and not mode:
            frameworks.add(framework)
        elif framework in FRAMEWORKS and mode in MODES[framework]:
            modes.add(token)
        else:
            raise ValueError(
                f"--only: unknown token {token!r}; use workloads {list(workloads)}, frameworks "
                f"{list(FRAMEWORKS)} or framework:mode"
            )
    return Selection(frozenset(names), frozenset(frameworks), frozenset(modes))


def plan(
    workloads: Sequence[Workload], selection: Selection, threads: int, data_dirs: dict[str, str]
) -> list[Case]:
    """Every case to run, in table order."""
    cases: list[Case] = []
    for work in workloads:
        if selection.workloads and work.name not in selection.workloads:
            continue
        for p in work.parallelism:
            for framework in FRAMEWORKS:
                for mode in MODES[framework]:
                    label = f"{framework}:{mode}"
                    named = label in selection.modes
                    narrowed = bool(selection.frameworks or selection.modes)
                    if narrowed and framework not in selection.frameworks and not named:
                        continue
                    if label in ON_REQUEST and not named:
                        continue
                    if mode == "sequential" and p != 1:
                        continue
                    # At P = 1 the bare loop and blazefl_fn run sequentially unless asked.
                    has_sequential = "sequential" in MODES[framework]
                    if p == 1 and has_sequential and mode != "sequential" and not named:
                        continue
                    cases.append(Case(work, framework, mode, p, threads, data_dirs[work.data_id]))
    return cases


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="FedAvg side by side: blazefl_fn, Flower, BlazeFL and a bare PyTorch loop.",
    )
    parser.add_argument("--quick", action="store_true", help="small workloads W1 and W0, P = 2")
    parser.add_argument("--only", help="comma-separated workloads, frameworks, framework:mode")
    parser.add_argument("--repeats", type=int, help="runs per case (default 3; --quick: 2)")
    parser.add_argument("--parallelism", help="P values for every workload, e.g. 1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads/worker")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="W.FIELD=VALUE",
        help="override a workload knob (clients, samples, epochs, batch_size, lr, rounds, "
        "shards_per_client, classes, seed, model, parallelism); W may be '*'",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--peers", type=Path, default=REPO_ROOT / "benchmarks" / ".peers")
    parser.add_argument("--data-dir", type=Path, help="keep the data files here (default: temp)")
    parser.add_argument("--no-install", action="store_true", help="fail if a peer venv is missing")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument(
        "--library",
        type=Path,
        metavar="TREE",
        help="run blazefl_fn from this source tree (a checkout holding blazefl_fn/) instead of "
        "the one beside the harness: an A/B of library versions with one harness",
    )
    parser.add_argument(
        "--wait-load",
        type=float,
        metavar="LOAD",
        help="before starting, wait (up to 30 min, in 10 s steps) until the 1-minute load "
        "average is below LOAD (a shared machine: e.g. 0.6)",
    )
    return parser


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def _wait_for_load(limit: float, steps: int = 180) -> None:
    for _ in range(steps):
        load = _load()[0]
        if load < limit:
            return
        print(f"[compare] load average {load:.2f} >= {limit}; waiting", flush=True)
        time.sleep(10)
    print(f"[compare] load average still {_load()[0]:.2f}; starting anyway", flush=True)


def _machine() -> dict[str, object]:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _interpreters(cases: Sequence[Case], args: argparse.Namespace) -> dict[str, Path]:
    pythons = {"bare": Path(sys.executable), "blazefl_fn": Path(sys.executable)}
    for framework in sorted({c.framework for c in cases} & set(PEER_ENV)):
        pythons[framework] = envs.ensure(
            args.peers, PEER_ENV[framework], install=not args.no_install,
            log=args.out / "logs" / f"install-{framework}.log",
        )  # fmt: skip
    return pythons


def _chart(json_path: Path, png: Path, args: argparse.Namespace) -> str:
    """Draw the chart in the plot venv; returns a line saying what happened."""
    try:
        python = envs.ensure(
            args.peers, "plot", install=not args.no_install, log=args.out / "logs" / "plot.log"
        )
    except (envs.EnvMissingError, subprocess.CalledProcessError) as exc:
        return f"chart skipped: matplotlib is not available ({exc})"
    done = subprocess.run(
        [str(python), "-m", "benchmarks.compare.plot", str(json_path), str(png)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return f"chart skipped: the plot script failed: {done.stderr.strip()[-500:]}"
    return f"chart: {png}"


def _row_json(row: report.Row, rows: Sequence[report.Row]) -> dict[str, object]:
    own = report.own_floor_seconds(rows, row.workload.name, row.parallelism, row.mode)
    return {
        "workload": row.workload.name,
        "parallelism": row.parallelism,
        "framework": row.framework,
        "mode": row.mode,
        "label": row.label,
        "ok": row.ok,
        "startup": row.startup,
        "loop": row.loop,
        "whole": row.whole,
        "floor": report.floor_seconds(rows, row.workload.name, row.parallelism),
        "own_kind_floor": own[0] if own else None,
        "own_kind_floor_mode": own[1] if own else None,
        "ideal": report.ideal_seconds(rows, row.workload, row.parallelism),
        "overhead_us_per_client": report.overhead_us(
            row, report.floor_seconds(rows, row.workload.name, row.parallelism)
        ),
        "client_seconds": row.client_seconds,
        "stable": row.stable,
        "digests": list(row.digests),
        "errors": list(row.errors),
    }


def main(argv: list[str] | None = None) -> list[report.Row]:
    """Run the benchmark; returns the rows (also written to ``--out``)."""
    args = _parser().parse_args(argv)
    library: Path | None = args.library
    if library is not None and not (library / "blazefl_fn" / "__init__.py").is_file():
        raise SystemExit(f"compare: --library {library} holds no blazefl_fn/__init__.py")
    if args.wait_load is not None:
        _wait_for_load(args.wait_load)
    began = time.perf_counter()
    load_before = _load()
    workloads = dict(QUICK if args.quick else DEFAULT)
    repeats = args.repeats or (2 if args.quick else 3)
    try:
        for assignment in args.set:
            workloads = override(workloads, assignment)
        if args.parallelism:
            ps = tuple(int(v) for v in args.parallelism.split(","))
            workloads = {k: dataclasses.replace(w, parallelism=ps) for k, w in workloads.items()}
        selection = parse_only(args.only, list(workloads))
    except ValueError as exc:
        raise SystemExit(f"compare: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    temp = None if args.data_dir else Path(tempfile.mkdtemp(prefix="blazefl-compare-"))
    data_root = args.data_dir or temp
    assert data_root is not None
    shim = None
    try:
        if library is not None:
            library = library.resolve()
            shim = Path(tempfile.mkdtemp(prefix="blazefl-library-"))
            (shim / "blazefl_fn").symlink_to(library / "blazefl_fn", target_is_directory=True)
        from .data import write_dataset

        chosen = [
            w
            for w in workloads.values()
            if not selection.workloads or w.name in selection.workloads
        ]
        data_dirs = {w.data_id: str(data_root / w.data_id) for w in chosen}
        cases = plan(chosen, selection, args.threads, data_dirs)
        if not cases:
            raise SystemExit("compare: nothing selected")
        try:
            pythons = _interpreters(cases, args)
        except envs.EnvMissingError as exc:
            raise SystemExit(f"compare: {exc}") from None
        data_digests = {}
        for w in chosen:
            print(f"[compare] data {w.data_id}", flush=True)
            data_digests[w.data_id] = write_dataset(w, Path(data_dirs[w.data_id]))
        runs: dict[int, list[Run]] = {i: [] for i in range(len(cases))}
        loads: list[float] = []
        # Interleaved repeats: slow drift of a shared machine hits every case alike.
        for rep in range(repeats):
            for i, case in enumerate(cases):
                name = f"{case.workload.name}-P{case.parallelism}-{case.framework}-{case.mode}"
                log = args.out / "logs" / f"{name}-{rep}.log"
                loads.append(_load()[0])
                mine = shim if case.framework == "blazefl_fn" else None
                run = run_case(case, pythons[case.framework], log, args.timeout, shim=mine)
                if mine is not None and library is not None:
                    run = imported_elsewhere(run, library)
                runs[i].append(run)
                what = (
                    f"loop {run.loop:7.2f} s  whole {run.whole:7.2f} s  "
                    f"{run.result.digest[:12] if run.result else run.error}"
                )
                print(
                    f"[compare] {rep + 1}/{repeats} {case.workload.name:12s} P={case.parallelism} "
                    f"{case.label:22s} {what}",
                    flush=True,
                )
    finally:
        for made in (temp, shim):
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
    rows = [
        report.make_row(c.workload, c.parallelism, c.framework, c.mode, runs[i])
        for i, c in enumerate(cases)
    ]
    total = time.perf_counter() - began
    _write(args, argv, rows, repeats, data_digests, (load_before, max(loads)), total)
    return rows


def _write(
    args: argparse.Namespace, argv: list[str] | None, rows: Sequence[report.Row], repeats: int,
    data_digests: dict[str, str], loads: tuple[tuple[float, float, float], float], total: float,
) -> None:  # fmt: skip
    load_before, load_max = loads
    command = "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    workloads = {r.workload.name: dataclasses.asdict(r.workload) for r in rows}
    data = {
        "title": f"FedAvg round loop (median of {repeats}), {os.cpu_count()} cores",
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "load_before": load_before,
        "load_after": _load(),
        "load_max_at_case_start": load_max,
        "total_seconds": total,
        "repeats": repeats,
        "threads": args.threads,
        "workloads": workloads,
        "data_digests": data_digests,
        "rows": [_row_json(r, rows) for r in rows],
    }
    json_path = args.out / "compare.json"
    json_path.write_text(json.dumps(data, indent=2))
    lines = [
        f"# FedAvg side by side (`{data['command']}`)",
        "",
        f"{data['date']}; {data['machine']}; load average before {load_before[0]:.2f}, "
        f"highest at a case's start {load_max:.2f}, after {data['load_after'][0]:.2f}; "
        f"medians of {repeats} runs, each a fresh process; total {total:.0f} s.",
        "",
        *report.table_lines(rows),
        "",
        *report.comparison_lines(rows),
        "",
        *report.target_lines(rows),
        "",
    ]
    (args.out / "compare.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"[compare] wrote {json_path} and {args.out / 'compare.md'}")
    if args.no_plot:
        print("[compare] chart skipped (--no-plot)")
    else:
        print("[compare]", _chart(json_path, args.out / "compare.png", args))
