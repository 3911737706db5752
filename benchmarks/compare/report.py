"""From repeated runs to rows, ratios, the markdown table and the issue's targets.

Definitions (per workload and parallelism P):

- floor (fastest floor): the fastest bare-loop round loop at that P (sequential at P = 1; the
  thread pool or the spawn pool at P = 2);
- own-kind floor: the bare loop of an executor's own kind at that P (``threads`` against the
  bare thread pool, ``processes`` and ``ray`` against the bare spawn pool, ``sequential``
  against the sequential loop); the issue's per-executor targets are stated against it;
- ideal: one client's update time (median, measured by the bare loop, preferably sequential)
  x clients x rounds / P;
- "blazefl_fn vs peer": the peer's median time divided by blazefl_fn's fastest mode at the
  same P, for the round loop and for the whole command;
- overhead per client: ``(loop - floor) * P / (clients * rounds)``, what one client costs a
  worker beyond the floor's cost of it (microseconds; negative when faster than the floor).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .execute import Run
from .spec import Workload

__all__ = [
    "Row",
    "Target",
    "comparison_lines",
    "fastest_bare",
    "ideal_seconds",
    "make_row",
    "overhead_us",
    "own_floor_seconds",
    "table_lines",
]


@dataclass(frozen=True)
class Row:
    """The medians of one case's repetitions."""

    workload: Workload
    parallelism: int
    framework: str
    mode: str
    startup: float
    loop: float
    whole: float
    digests: tuple[str, ...]
    client_seconds: float | None
    errors: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``framework:mode``."""
        return f"{self.framework}:{self.mode}"

    @property
    def stable(self) -> bool:
        """All repetitions produced bitwise identical final parameters."""
        return len(self.digests) > 0 and len(set(self.digests)) == 1

    @property
    def ok(self) -> bool:
        """At least one repetition finished."""
        return len(self.digests) > 0


def make_row(
    workload: Workload, parallelism: int, framework: str, mode: str, runs: Sequence[Run]
) -> Row:
    """Medians over the successful runs (errors are kept for the report)."""
    good = [r for r in runs if r.result is not None]
    clients = [r.result.client_seconds for r in good if r.result and r.result.client_seconds]

    def med(values: Iterable[float]) -> float:
        values = list(values)
        return statistics.median(values) if values else float("nan")

    return Row(
        workload=workload,
        parallelism=parallelism,
        framework=framework,
        mode=mode,
        startup=med(r.startup for r in good),
        loop=med(r.loop for r in good),
        whole=med(r.whole for r in good),
        digests=tuple(r.result.digest for r in good if r.result),
        client_seconds=med(clients) if clients else None,
        errors=tuple(r.error for r in runs if r.error),
    )


def _group(rows: Sequence[Row], workload: str, parallelism: int) -> list[Row]:
    return [r for r in rows if r.workload.name == workload and r.parallelism == parallelism]


def fastest_bare(rows: Sequence[Row], workload: str, parallelism: int) -> Row | None:
    """The bare row with the fastest loop at that P, or None if no bare row ran."""
    bare = [r for r in _group(rows, workload, parallelism) if r.framework == "bare" and r.ok]
    return min(bare, key=lambda r: r.loop) if bare else None


def floor_seconds(rows: Sequence[Row], workload: str, parallelism: int) -> float | None:
    """The fastest bare loop at that P, or None if no bare row ran."""
    row = fastest_bare(rows, workload, parallelism)
    return None if row is None else row.loop


# The bare loop each blazefl_fn mode is held to: the same kind of parallelism (Ray's actors are
# processes, so Ray is held to the spawn pool).
OWN_FLOOR = {
    "sequential": "sequential",
    "threads": "threads",
    "processes": "processes",
    "ray": "processes",
}


def own_floor_seconds(
    rows: Sequence[Row], workload: str, parallelism: int, mode: str
) -> tuple[float, str] | None:
    """The bare loop of ``mode``'s own kind at that P and its mode, or None if it did not run."""
    kind = OWN_FLOOR.get(mode)
    for r in _group(rows, workload, parallelism):
        if r.framework == "bare" and r.mode == kind and r.ok:
            return r.loop, kind
    return None


def ideal_seconds(rows: Sequence[Row], workload: Workload, parallelism: int) -> float | None:
    """One client's update x clients x rounds / P, from the bare loop's client timing."""
    bare = [
        r
        for r in rows
        if r.workload.name == workload.name and r.framework == "bare" and r.client_seconds
    ]
    if not bare:
        return None
    # Prefer the sequential loop: nothing else runs while it times a client.
    best = min(bare, key=lambda r: (r.mode != "sequential", r.parallelism))
    assert best.client_seconds is not None
    return best.client_seconds * workload.clients * workload.rounds / parallelism


def best_fn(rows: Sequence[Row], workload: str, parallelism: int, key: str) -> Row | None:
    """blazefl_fn's fastest row at that P by ``key`` ("loop" or "whole")."""
    mine = [r for r in _group(rows, workload, parallelism) if r.framework == "blazefl_fn" and r.ok]
    return min(mine, key=lambda r: getattr(r, key)) if mine else None


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def overhead_us(row: Row, floor: float | None) -> float | None:
    """What one client costs a worker beyond the floor, in microseconds (None: no floor)."""
    if floor is None:
        return None
    clients = row.workload.clients * row.workload.rounds
    return (row.loop - floor) * row.parallelism / clients * 1e6


def _overhead(row: Row, floor: float | None) -> str:
    value = overhead_us(row, floor)
    return "-" if value is None else f"{value:+.0f}"


def table_lines(rows: Sequence[Row]) -> list[str]:
    """The main markdown table: one line per case."""
    lines = [
        "| workload | P | framework:mode | start-up s | round loop s | whole s "
        "| loop / fastest floor | loop / own-kind floor | overhead µs/client | loop / ideal "
        "| bitwise stable | final digest |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        if not row.ok:
            lines.append(
                f"| {row.workload.name} | {row.parallelism} | {row.label} | failed: "
                f"{'; '.join(row.errors)} | | | | | | | | |"
            )
            continue
        floor = floor_seconds(rows, row.workload.name, row.parallelism)
        own = own_floor_seconds(rows, row.workload.name, row.parallelism, row.mode)
        ideal = ideal_seconds(rows, row.workload, row.parallelism)
        distinct = len(set(row.digests))
        stable = (
            f"yes ({len(row.digests)} runs)"
            if row.stable
            else f"NO ({distinct} digests in {len(row.digests)} runs)"
        )
        lines.append(
            f"| {row.workload.name} | {row.parallelism} | {row.label} | {row.startup:.2f} "
            f"| {row.loop:.2f} | {row.whole:.2f} | {_ratio(row.loop, floor)} "
            f"| {_ratio(row.loop, own[0] if own else None)} | {_overhead(row, floor)} "
            f"| {_ratio(row.loop, ideal)} | {stable} "
            f"| {row.digests[0][:12]} |"
        )
    return lines


def comparison_lines(rows: Sequence[Row]) -> list[str]:
    """blazefl_fn's fastest mode against every peer row at the same workload and P."""
    lines = [
        "| workload | P | peer | peer loop s | blazefl_fn loop s | loop speed-up "
        "| peer whole s | blazefl_fn whole s | whole speed-up |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.framework in ("bare", "blazefl_fn") or not row.ok:
            continue
        loop = best_fn(rows, row.workload.name, row.parallelism, "loop")
        whole = best_fn(rows, row.workload.name, row.parallelism, "whole")
        if loop is None or whole is None:
            continue
        lines.append(
            f"| {row.workload.name} | {row.parallelism} | {row.label} | {row.loop:.2f} "
            f"| {loop.loop:.2f} ({loop.mode}) | {row.loop / loop.loop:.2f}x "
            f"| {row.whole:.2f} | {whole.whole:.2f} ({whole.mode}) "
            f"| {row.whole / whole.whole:.2f}x |"
        )
    return lines


# Many small clients: blazefl_fn's loop over the bare floor, per executor.
W0_GOALS = {"threads": 1.05, "processes": 1.15, "ray": 1.30}


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, evaluated on the measured rows."""

    text: str
    measured: str
    met: bool | None  # None: not measured in this run


def _floor_target(
    rows: Sequence[Row],
    by: dict[tuple[str, int, str], Row],
    workload: str,
    parallelism: int,
    mode: str,
    goal: float,
) -> Target:
    """blazefl_fn ``mode``'s loop within ``goal`` x the bare loop of its own kind.

    The verdict is against the own-kind floor (the issue's definition); the ratio to the
    fastest floor is shown beside it, labelled, and decides nothing.
    """
    kind = OWN_FLOOR[mode]
    text = f"{workload} blazefl_fn {mode} within {goal:.2f}x of the bare {kind} floor"
    row = by.get((workload, parallelism, f"blazefl_fn:{mode}"))
    own = own_floor_seconds(rows, workload, parallelism, mode)
    if row is None or own is None:
        return Target(text, "-", None)
    ratio = row.loop / own[0]
    measured = (
        f"{row.loop:.2f} s / {own[0]:.2f} s (bare {kind}) = {ratio:.3f} "
        f"({overhead_us(row, own[0]):+.0f} µs/client)"
    )
    fastest = fastest_bare(rows, workload, parallelism)
    if fastest is not None:
        measured += (
            f"; vs the fastest floor (bare {fastest.mode}, {fastest.loop:.2f} s): "
            f"{row.loop / fastest.loop:.3f}"
        )
    return Target(text, measured, ratio <= goal)


def targets(rows: Sequence[Row], parallelism: int = 2) -> list[Target]:
    """The issue's targets at P = ``parallelism``: W1 against the floor and Flower, W0."""
    out: list[Target] = []
    by = {(r.workload.name, r.parallelism, r.label): r for r in rows if r.ok}
    for mode in ("threads", "processes"):
        out.append(_floor_target(rows, by, "W1", parallelism, mode, 1.05))
    flower = by.get(("W1", parallelism, "flower:ray"))
    loop = best_fn(rows, "W1", parallelism, "loop")
    whole = best_fn(rows, "W1", parallelism, "whole")
    for name, key, goal, mine in (
        ("round loop", "loop", 1.7, loop),
        ("whole command", "whole", 3.0, whole),
    ):
        if flower is None or mine is None:
            out.append(Target(f"W1 >= {goal}x faster than Flower ({name})", "-", None))
            continue
        speedup = getattr(flower, key) / getattr(mine, key)
        out.append(
            Target(
                f"W1 >= {goal}x faster than Flower ({name})",
                f"{getattr(flower, key):.2f} s / {getattr(mine, key):.2f} s "
                f"({mine.mode}) = {speedup:.2f}x",
                speedup >= goal,
            )
        )
    for mode, goal in W0_GOALS.items():
        out.append(_floor_target(rows, by, "W0", parallelism, mode, goal))
    flower0 = by.get(("W0", parallelism, "flower:ray"))
    loop0 = best_fn(rows, "W0", parallelism, "loop")
    if flower0 is None or loop0 is None:
        out.append(Target("W0 >= 5x faster than Flower (round loop)", "-", None))
    else:
        speedup = flower0.loop / loop0.loop
        out.append(
            Target(
                "W0 >= 5x faster than Flower (round loop)",
                f"{flower0.loop:.2f} s / {loop0.loop:.2f} s ({loop0.mode}) = {speedup:.2f}x",
                speedup >= 5.0,
            )
        )
    return out


def target_lines(rows: Sequence[Row], parallelism: int = 2) -> list[str]:
    """The targets as a markdown table."""
    lines = [f"| target (P = {parallelism}) | measured | met |", "|---|---|---|"]
    for t in targets(rows, parallelism):
        verdict = "not run" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.text} | {t.measured} | {verdict} |")
    return lines
