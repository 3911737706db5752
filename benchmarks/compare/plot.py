"""Draw the comparison chart from ``compare.json``: round-loop time per case, ideal marked.

Runs in the ``benchmarks/.peers/plot`` venv (matplotlib is not a project dependency):
``python -m benchmarks.compare.plot results/compare.json results/compare.png``.
Standard library plus matplotlib only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"bare": "#7f7f7f", "blazefl_fn": "#1f77b4", "flower": "#d62728", "blazefl": "#ff7f0e"}


def draw(data: dict[str, Any], out: Path) -> None:
    """One panel per (workload, P): horizontal bars of the median round loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, Any]] = [r for r in data["rows"] if r["ok"]]
    groups = list(dict.fromkeys((r["workload"], r["parallelism"]) for r in rows))
    cols = min(3, len(groups))
    nrows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, (workload, p) in zip(axes.flat, groups, strict=False):
        mine = [r for r in rows if r["workload"] == workload and r["parallelism"] == p]
        labels = [r["label"] for r in mine]
        values = [r["loop"] for r in mine]
        colors = [COLORS.get(r["framework"], "#2ca02c") for r in mine]
        ax.barh(labels, values, color=colors)
        ax.invert_yaxis()
        ideal = mine[0].get("ideal")
        if ideal:
            ax.axvline(ideal, color="black", linestyle="--", linewidth=1, label="ideal")
            ax.legend(loc="best", fontsize=7)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.1f}", va="center", fontsize=7)
        ax.set_title(f"{workload}, P = {p}: round loop (s)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, max(values) * 1.2)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(data.get("title", "FedAvg round loop, median of repeats"), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """``plot.py JSON PNG``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m benchmarks.compare.plot compare.json compare.png")
    draw(json.loads(Path(args[0]).read_text()), Path(args[1]))


if __name__ == "__main__":
    main()
