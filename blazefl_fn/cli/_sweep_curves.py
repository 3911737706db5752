"""A sweep's ``curves.png``: each group's mean test accuracy per round, with a band of one
standard deviation over seeds (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import replaced_atomically

if TYPE_CHECKING:
    from ._sweep_summary import GroupRow

__all__ = ["write_curves"]


def write_curves(rows: Sequence[GroupRow], path: Path) -> bool:
    """Draw each group's mean test accuracy per round, with a band of one standard deviation,
    into ``path``; False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig, axes = plt.subplots(figsize=(6, 4))
    ax: Any = axes  # matplotlib's stubs leave keyword arguments untyped
    try:
        for r in rows:
            xs = [c[0] for c in r.curve]
            means = [c[1] for c in r.curve]
            stds = [c[2] for c in r.curve]
            (line,) = ax.plot(xs, means, label=f"{r.label} (n={len(r.seeds)})")
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(visible=True, alpha=0.3)
        if rows:
            ax.legend(fontsize="small")
        fig.tight_layout()
        with replaced_atomically(path, "plot") as tmp:
            fig.savefig(tmp, dpi=110)  # pyright: ignore[reportUnknownMemberType]  # kwargs untyped
    finally:
        plt.close(fig)
    return True
