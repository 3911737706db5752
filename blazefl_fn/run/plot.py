"""Accuracy and loss curves of one or several runs from their metrics logs (needs matplotlib)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._files import replaced_atomically
from .metrics_log import read_metrics

__all__ = ["plot_runs"]

_PANELS = (
    ("eval", "accuracy", "test accuracy"),
    ("eval", "loss", "test loss"),
    ("train", "loss", "train loss"),
)


def _series(records: list[dict[str, Any]], group: str, name: str) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for record in records:
        values = record.get(group)
        if isinstance(values, dict) and isinstance(values.get(name), int | float):  # pyright: ignore[reportUnknownMemberType]
            value = float(values[name])  # pyright: ignore[reportUnknownArgumentType]
            if math.isfinite(value):
                xs.append(int(record["round"]))
                ys.append(value)
    return xs, ys


def plot_runs(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
) -> Path:
    """Draw test accuracy, test loss and train loss per round of each run into ``out``.

    Args:
        paths: metrics logs (JSON Lines from ``--metrics``), one curve each.
        out: the image file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``).
        labels: legend entries; the file names' stems by default.

    Returns:
        ``out`` as a `Path`; it is written atomically (temporary file, then rename).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'blazefl_fn[plot]'``).
        FileNotFoundError: a log is missing.
        ValueError: no paths, labels of the wrong length, a malformed log, or a log with no
            records.
    """
    if not paths:
        raise ValueError("plot needs at least one metrics log")
    names = [Path(p).stem for p in paths] if labels is None else list(labels)
    if len(names) != len(paths):
        raise ValueError(f"got {len(names)} labels for {len(paths)} logs")
    runs = [read_metrics(p) for p in paths]
    for path, records in zip(paths, runs, strict=True):
        if not records:
            raise ValueError(f"{path}: no records to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib: pip install 'blazefl_fn[plot]' (or matplotlib)"
        ) from e
    target = Path(out)
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 3.6))
    try:
        for ax, (group, metric, title) in zip(axes, _PANELS, strict=True):
            for name, records in zip(names, runs, strict=True):
                xs, ys = _series(records, group, metric)
                if xs:
                    ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=name)
            ax.set_title(title)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(visible=True, alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        with replaced_atomically(target, "plot") as tmp:
            fig.savefig(tmp, dpi=110)  # pyright: ignore[reportUnknownMemberType]  # kwargs untyped
    finally:
        plt.close(fig)
    return target
