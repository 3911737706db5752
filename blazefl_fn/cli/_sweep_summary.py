"""A sweep's summary, from its cells' metrics logs alone: ``summary.md``, ``summary.csv`` (one
row per group of cells that differ only in ``seed``) and ``curves.png``.

Numbers per group: the mean, sample standard deviation and 95% interval (Student's t, n - 1
degrees of freedom) of the final test accuracy over seeds; the mean best accuracy; the mean
rounds to ``target_accuracy`` over the seeds that reached it; the mean bytes up and down and
the mean wall time of a cell. When the cells evaluated every client on its own held-out split
(``client_accuracy`` and ``client_accuracy_p10`` in their last evaluation: ``--eval-clients`` or
``--client-test-fraction``), also the mean and standard deviation over seeds of the mean
per-client accuracy and of the worst-10% per-client accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .._files import replaced_atomically
from ..run.metrics_log import read_metrics
from ..run.simulate import RESUMABLE_CHANGES
from ._sweep_curves import write_curves
from ._t_quantile import t_quantile

METRICS = "metrics.jsonl"
RESULT = "result.json"
"""Written by the sweep once a cell's run has ended well: the cell is finished."""


@attrs.frozen
class CellLog:
    """What a cell's metrics log says of its run.

    Attributes:
        name: the cell's directory name.
        config: the resolved settings of the run's latest stretch (the log's last ``config``).
        accuracy: ``(round, test accuracy)`` of every evaluated round, in order.
        bytes_up: bytes sent by clients over all rounds.
        bytes_down: bytes sent to clients over all rounds.
        wall_seconds: the run's time, summed over its stretches (a resumed run starts another).
        finished: whether the sweep recorded the run as ended (``result.json``).
        client_accuracy: the mean per-client accuracy of the last evaluation (None when it
            evaluated no client).
        client_accuracy_p10: the worst-10% per-client accuracy of that evaluation (or None).
    """

    name: str
    config: Mapping[str, Any]
    accuracy: tuple[tuple[int, float], ...]
    bytes_up: int
    bytes_down: int
    wall_seconds: float
    finished: bool
    client_accuracy: float | None = None
    client_accuracy_p10: float | None = None


def _number(metrics: Mapping[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) else None


def read_cell(directory: Path) -> CellLog | None:
    """The log of the cell in ``directory``; None when it holds no record yet.

    Raises:
        ValueError: a malformed log, or records without the run's config.
    """
    path = directory / METRICS
    if not path.is_file():
        return None
    records = read_metrics(path)
    if not records:
        return None
    config: Mapping[str, Any] | None = None
    accuracy: list[tuple[int, float]] = []
    last_eval: Mapping[str, Any] = {}
    wall = 0.0
    stretch = 0.0
    for record in records:
        if "config" in record:  # a (resumed) run's first record: a new stretch of wall time
            config = record["config"]
            wall += stretch
        stretch = float(record.get("wall") or 0.0)
        metrics: dict[str, Any] = record.get("eval") or {}
        value = metrics.get("accuracy")
        if isinstance(value, int | float):
            accuracy.append((int(record["round"]), float(value)))
            last_eval = metrics
    if config is None:
        raise ValueError(f"{path}: no record carries the run's config")
    return CellLog(
        name=directory.name,
        config=config,
        accuracy=tuple(accuracy),
        bytes_up=sum(int(r.get("bytes_up") or 0) for r in records),
        bytes_down=sum(int(r.get("bytes_down") or 0) for r in records),
        wall_seconds=wall + stretch,
        finished=(directory / RESULT).is_file(),
        client_accuracy=_number(last_eval, "client_accuracy"),
        client_accuracy_p10=_number(last_eval, "client_accuracy_p10"),
    )


def read_cells(out: Path) -> list[CellLog]:
    """Every cell log under the sweep directory ``out``, by directory name."""
    found = (read_cell(d) for d in sorted(out.iterdir()) if d.is_dir())
    return [cell for cell in found if cell is not None]


@attrs.frozen
class GroupRow:
    """One row of the summary: the cells that differ only in their seed.

    Attributes:
        axes: ``(setting, value)`` of each setting that varies between groups.
        seeds: the seeds of the group's finished cells.
        final_mean: mean final test accuracy.
        final_std: its sample standard deviation (nan with one seed).
        ci_low: low end of the 95% interval of the mean (nan with one seed).
        ci_high: high end of that interval.
        best_mean: mean of each cell's best test accuracy.
        target: the ``target_accuracy`` setting, or None.
        rounds_to_target: mean first round reaching ``target``, over the seeds that did (nan if
            none did, or no target).
        reached: how many seeds reached ``target``.
        bytes_up: mean bytes up of a cell.
        bytes_down: mean bytes down of a cell.
        wall_seconds: mean wall time of a cell.
        curve: ``(round, mean, std)`` of test accuracy at the rounds every seed evaluated.
        client_mean: mean over seeds of the final mean per-client accuracy (nan unless every
            seed's last evaluation has it).
        client_std: its sample standard deviation over seeds (nan with one seed).
        p10_mean: mean over seeds of the final worst-10% per-client accuracy (nan as above).
        p10_std: its sample standard deviation over seeds.
    """

    axes: tuple[tuple[str, Any], ...]
    seeds: tuple[int, ...]
    final_mean: float
    final_std: float
    ci_low: float
    ci_high: float
    best_mean: float
    target: float | None
    rounds_to_target: float
    reached: int
    bytes_up: float
    bytes_down: float
    wall_seconds: float
    curve: tuple[tuple[int, float, float], ...]
    client_mean: float = math.nan
    client_std: float = math.nan
    p10_mean: float = math.nan
    p10_std: float = math.nan

    @property
    def label(self) -> str:
        """The group's settings as ``name=value`` words (``all`` when nothing varies)."""
        return " ".join(f"{k}={v}" for k, v in self.axes) or "all"


def _key(config: Mapping[str, Any], axes: Sequence[str]) -> str:
    # The settings that fix a run's bits, and the axes: a resumable setting changed in the
    # file since some cells finished (executor, workers) does not split their group.
    fixed = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES or k in axes}
    fixed.pop("seed", None)
    return json.dumps(fixed, sort_keys=True)


def _sort_key(value: object) -> tuple[int, float, str]:
    # None first, numbers by value, the rest by text: any mix of setting values sorts.
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _best(cell: CellLog) -> float:
    return max((a for _, a in cell.accuracy), default=math.nan)


def _spread(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of ``values``; nan unless every one is there."""
    present = [v for v in values if v is not None]
    if not present or len(present) < len(values):
        return math.nan, math.nan
    std = statistics.stdev(present) if len(present) > 1 else math.nan
    return statistics.fmean(present), std


def _row(axes: tuple[tuple[str, Any], ...], cells: Sequence[CellLog]) -> GroupRow:
    cells = sorted(cells, key=lambda c: _sort_key(c.config.get("seed")))
    finals = [c.accuracy[-1][1] if c.accuracy else math.nan for c in cells]
    n = len(finals)
    mean = statistics.fmean(finals)
    std = statistics.stdev(finals) if n > 1 else math.nan
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    target = cells[0].config.get("target_accuracy")
    firsts = [
        next((r for r, a in c.accuracy if a >= target), None) if target is not None else None
        for c in cells
    ]
    reached = [r for r in firsts if r is not None]
    series = [dict(c.accuracy) for c in cells]
    common = sorted(set[int].intersection(*(set(s) for s in series)))
    curve = tuple(
        (
            r,
            statistics.fmean(s[r] for s in series),
            statistics.stdev([s[r] for s in series]) if n > 1 else 0.0,
        )
        for r in common
    )
    client_mean, client_std = _spread([c.client_accuracy for c in cells])
    p10_mean, p10_std = _spread([c.client_accuracy_p10 for c in cells])
    return GroupRow(
        axes=axes,
        seeds=tuple(int(c.config.get("seed", 0)) for c in cells),
        final_mean=mean,
        final_std=std,
        ci_low=mean - half,
        ci_high=mean + half,
        best_mean=statistics.fmean(_best(c) for c in cells),
        target=target,
        rounds_to_target=statistics.fmean(reached) if reached else math.nan,
        reached=len(reached),
        bytes_up=statistics.fmean(c.bytes_up for c in cells),
        bytes_down=statistics.fmean(c.bytes_down for c in cells),
        wall_seconds=statistics.fmean(c.wall_seconds for c in cells),
        curve=curve,
        client_mean=client_mean,
        client_std=client_std,
        p10_mean=p10_mean,
        p10_std=p10_std,
    )


def group_rows(cells: Sequence[CellLog], axes: Sequence[str] | None = None) -> list[GroupRow]:
    """The finished cells grouped by every setting but ``seed``, one row per group.

    Args:
        cells: the cells' logs.
        axes: the sweep's axes, the settings a row names (``seed`` left out); None: the
            settings that differ between groups.

    Returns:
        The rows, sorted by the settings they name.
    """
    names = [] if axes is None else [a for a in axes if a != "seed"]
    groups: dict[str, list[CellLog]] = {}
    for cell in cells:
        if cell.finished:
            groups.setdefault(_key(cell.config, names), []).append(cell)
    if axes is None:
        configs = [json.loads(key) for key in groups]
        fields = sorted({k for c in configs for k in c})
        names = [k for k in fields if len({json.dumps(c.get(k)) for c in configs}) > 1]
    rows = [
        _row(tuple((k, members[0].config.get(k)) for k in names), members)
        for members in groups.values()
    ]
    return sorted(rows, key=lambda r: [_sort_key(v) for _, v in r.axes])


_CLIENT_COLUMNS = (
    "client_accuracy_mean",
    "client_accuracy_std",
    "client_accuracy_p10_mean",
    "client_accuracy_p10_std",
)
"""After ``best_accuracy_mean`` when some row evaluated its clients (`_per_client`)."""

_COLUMNS = (
    "seeds",
    "n",
    "final_accuracy_mean",
    "final_accuracy_std",
    "final_accuracy_ci95_low",
    "final_accuracy_ci95_high",
    "best_accuracy_mean",
    "target_accuracy",
    "rounds_to_target_mean",
    "reached_target",
    "bytes_up_mean",
    "bytes_down_mean",
    "wall_seconds_mean",
)


def _csv_number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else repr(value)


def _per_client(rows: Sequence[GroupRow]) -> bool:
    """Whether some row has per-client accuracies: the summary then has their columns."""
    return any(not math.isnan(r.client_mean) for r in rows)


def summary_csv(rows: Sequence[GroupRow]) -> str:
    """The rows as CSV: the varying settings, then `_COLUMNS`, with `_CLIENT_COLUMNS` after
    ``best_accuracy_mean`` when some row has them (an empty field: no value)."""
    axes = [k for k, _ in rows[0].axes] if rows else []
    clients = _per_client(rows)
    at = _COLUMNS.index("best_accuracy_mean") + 1
    columns = (*_COLUMNS[:at], *(_CLIENT_COLUMNS if clients else ()), *_COLUMNS[at:])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*axes, *columns])
    for r in rows:
        per_client = (r.client_mean, r.client_std, r.p10_mean, r.p10_std) if clients else ()
        numbers = (
            r.final_mean,
            r.final_std,
            r.ci_low,
            r.ci_high,
            r.best_mean,
            *per_client,
            r.target,
            r.rounds_to_target,
        )
        writer.writerow(
            [
                *(v for _, v in r.axes),
                " ".join(str(s) for s in r.seeds),
                len(r.seeds),
                *(_csv_number(v) for v in numbers),
                r.reached if r.target is not None else "",
                *(_csv_number(v) for v in (r.bytes_up, r.bytes_down, r.wall_seconds)),
            ]
        )
    return buffer.getvalue()


def _f(value: float, spec: str = ".4f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _mean_std(mean: float, std: float) -> str:
    return _f(mean) + ("" if math.isnan(std) else f" ± {std:.4f}")


def summary_markdown(rows: Sequence[GroupRow], unfinished: Sequence[str]) -> str:
    """The rows as a Markdown table, with a line on cells not (yet) finished."""
    axes = [k for k, _ in rows[0].axes] if rows else []
    target = next((r.target for r in rows if r.target is not None), None)
    clients = _per_client(rows)
    head = [
        *axes,
        "seeds",
        "final accuracy",
        "95% interval",
        "best accuracy",
        *(["client accuracy", "worst-10% client accuracy"] if clients else []),
        *([f"rounds to {target:g}"] if target is not None else []),
        "MB up",
        "MB down",
        "wall s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spread = "" if math.isnan(r.final_std) else f" ± {r.final_std:.4f}"
        reach = (
            [f"{_f(r.rounds_to_target, '.1f')} ({r.reached}/{len(r.seeds)})"]
            if target is not None
            else []
        )
        cells = [
            *(str(v) for _, v in r.axes),
            str(len(r.seeds)),
            f"{r.final_mean:.4f}{spread}",
            "-" if math.isnan(r.ci_low) else f"[{r.ci_low:.4f}, {r.ci_high:.4f}]",
            _f(r.best_mean),
            *(
                [_mean_std(r.client_mean, r.client_std), _mean_std(r.p10_mean, r.p10_std)]
                if clients
                else []
            ),
            *reach,
            f"{r.bytes_up / 1e6:.2f}",
            f"{r.bytes_down / 1e6:.2f}",
            f"{r.wall_seconds:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if unfinished:
        text += f"\nNot finished (not in the table): {', '.join(unfinished)}\n"
    return text


def write_summary(
    out: Path, axes: Sequence[str] | None = None
) -> tuple[list[GroupRow], list[Path]]:
    """Write ``summary.md``, ``summary.csv`` and ``curves.png`` (with matplotlib) into the sweep
    directory ``out`` from its cells' logs, each atomically; a row per `group_rows` of ``axes``.

    Returns:
        The rows and the files written.

    Raises:
        ValueError: a malformed metrics log.
    """
    logs = read_cells(out)
    rows = group_rows(logs, axes)
    unfinished = [c.name for c in logs if not c.finished]
    written: list[Path] = []
    for name, text in (
        ("summary.md", summary_markdown(rows, unfinished)),
        ("summary.csv", summary_csv(rows)),
    ):
        with replaced_atomically(out / name, "summary") as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    if write_curves(rows, out / "curves.png"):
        written.append(out / "curves.png")
    return rows, written
