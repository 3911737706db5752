"""Progress output for runs: a tqdm bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any, TextIO

from ..records import ServerState
from .loop import Callback, LoopResult, RoundEvent

__all__ = ["BarProgress", "LineProgress", "progress_callback"]


def _fmt(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"


class LineProgress(Callback):
    """Writes one line per round to ``out``: round, clients, train loss, test metrics, seconds.

    Examples:
        >>> import io
        >>> from blazefl_fn.records import RoundReport
        >>> out = io.StringIO()
        >>> p = LineProgress(out)
        >>> p.on_begin(ServerState(params={}), rounds=10)
        >>> report = RoundReport(0, (1, 2), 20, {"loss": 0.5}, 0, 0, 0.25)
        >>> p.on_round_end(RoundEvent(ServerState(params={}, round=1), report, None, 0.3))
        >>> out.getvalue()
        'round  1/10  clients 2  train_loss 0.5000  0.25s\\n'
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.total = 0

    def on_begin(self, state: ServerState, rounds: int) -> None:
        self.total = rounds
        if state.round > 0:
            self.out.write(f"resuming after round {state.round}/{rounds}\n")
            self.out.flush()

    def on_round_end(self, event: RoundEvent) -> None:
        width = len(str(self.total))
        report = event.report
        line = (
            f"round {event.state.round:>{width}}/{self.total}  clients {len(report.clients)}"
            f"  train_loss {_fmt(report.train_metrics.get('loss'))}"
        )
        if report.skipped:
            line += f"  skipped {len(report.skipped)} (non-finite)"
        if event.metrics is not None:
            line += (
                f"  test_acc {_fmt(event.metrics.get('accuracy'))}"
                f"  test_loss {_fmt(event.metrics.get('loss'))}"
            )
        self.out.write(f"{line}  {report.seconds:.2f}s\n")
        self.out.flush()


class BarProgress(Callback):
    """A tqdm progress bar over rounds, showing the latest test accuracy.

    Raises:
        ImportError: tqdm is not installed (``pip install 'blazefl_fn[progress]'``).
    """

    def __init__(self, out: TextIO) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.out = out
        self._bar: Any = None

    def on_begin(self, state: ServerState, rounds: int) -> None:
        size = shutil.get_terminal_size()
        self._bar = self._tqdm(
            total=rounds,
            initial=state.round,
            unit="round",
            file=self.out,
            # A terminal that reports a 0x0 size would hide the bar; shutil falls back to
            # $COLUMNS x $LINES or 80x24.
            ncols=size.columns,
            nrows=size.lines,
        )

    def on_round_end(self, event: RoundEvent) -> None:
        if self._bar is None:
            return
        postfix = {"loss": _fmt(event.report.train_metrics.get("loss"))}
        if event.metrics is not None:
            postfix["acc"] = _fmt(event.metrics.get("accuracy"))
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_interrupt(self, state: ServerState) -> None:
        self._close()

    def on_end(self, result: LoopResult) -> None:
        self._close()


def progress_callback(out: TextIO, *, quiet: bool = False, bar: bool | None = None) -> Callback:
    """The progress display for ``out``: nothing if ``quiet``, else a bar or plain lines.

    Args:
        out: where progress goes.
        quiet: show nothing.
        bar: force (True) or refuse (False) the tqdm bar; None uses it when ``out`` is a
            terminal and tqdm is installed.
    """
    if quiet:
        return Callback()
    if bar is None:
        bar = out.isatty() and importlib.util.find_spec("tqdm") is not None
    return BarProgress(out) if bar else LineProgress(out)
