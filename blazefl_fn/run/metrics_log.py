"""A JSON Lines log with one record per round, written as the run goes.

Each line is flushed as soon as its round ends, so a crash loses at most the round in progress.
When a run resumes from a checkpoint of round ``t``, the records after round ``t`` (rounds that
will be run again) and any partial last line are dropped first, by an atomic rewrite, so the
log of a resumed run holds every round exactly once.

A record::

    {"round": 3, "clients": [4, 17, ...], "num_examples": 5120, "train": {"loss": 0.41},
     "eval": {"accuracy": 0.93, "loss": 0.22} or null, "bytes_up": ..., "bytes_down": ...,
     "seconds": 0.84, "wall": 2.51}

A private run (`blazefl_fn.privacy`) adds ``"privacy": {"epsilon": 2.13, "delta": 1e-05}``,
the budget spent after that round (``epsilon`` null when no noise is added). Given a ``config``
(the command line gives its resolved `RunConfig` as a dict), the first record each run writes
carries it as ``"config"``: round 1 of a fresh run, the first resumed round after ``--resume``
(whose executor or workers may differ), so every record can be traced to the settings that
produced it.

``round`` counts completed rounds (1 for the first), ``seconds`` is the round's own time and
``wall`` the time since the (possibly resumed) run began.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

from .._files import check_output, replaced_atomically
from ..records import ServerState
from .loop import Callback, LoopResult, RoundEvent

__all__ = ["MetricsLog", "read_metrics"]


def _clean(value: float) -> float | None:
    # JSON has no NaN or infinity; null keeps every line valid JSON.
    return value if math.isfinite(value) else None


def _metrics(values: Mapping[str, float] | None) -> dict[str, float | None] | None:
    if values is None:
        return None
    return {name: _clean(float(v)) for name, v in values.items()}


def _parse(path: Path, text: str, *, strict: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    lines = text.split("\n")
    complete = lines[:-1]  # after the last newline: an unfinished line, or ""
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):  # pyright: ignore[reportUnknownMemberType]
            raise ValueError(f"{path}:{number}: a record needs an integer 'round'")
        records.append(cast(dict[str, Any], record))
    if strict and lines[-1].strip():
        raise ValueError(f"{path}: the last line is incomplete")
    return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics log, in file order; an unfinished last line is skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a complete line is not a JSON object with an integer ``round``.

    Examples:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = pathlib.Path(d, "m.jsonl")
        ...     _ = p.write_text('{"round": 1, "eval": null}\\n{"round": 2')
        ...     [r["round"] for r in read_metrics(p)]
        [1]
    """
    p = Path(path)
    return _parse(p, p.read_text(encoding="utf-8"), strict=False)


class MetricsLog(Callback):
    """Appends one JSON line per round to ``path`` and flushes it.

    At the start of a loop it keeps only the records of rounds the starting state has completed
    (none for a fresh run), so a resumed run neither loses nor repeats a round. ``numerics``
    (how the run computes: `blazefl_fn.portable.numerics`) is written into every record, and
    ``config`` (JSON-serialisable settings, e.g. `blazefl_fn.run.simulate.config_dict` of the run's
    config) into the first record this loop writes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        numerics: Mapping[str, object] | None = None,
        config: Mapping[str, object] | None = None,
    ) -> None:
        self.path = Path(path)
        self.numerics = dict(numerics or {})
        self.config = None if config is None else dict(config)
        self._file: IO[str] | None = None
        self._first = True

    def on_begin(self, state: ServerState, rounds: int) -> None:
        # Before reading it: a FIFO would block the read, a device be replaced by the write.
        check_output(self.path, f"metrics log {self.path}")
        kept: list[dict[str, Any]] = []
        if state.round > 0 and self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            kept = [r for r in _parse(self.path, text, strict=False) if r["round"] <= state.round]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(self.path, "metrics log") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  # closed in on_end
        self._first = True

    def on_round_end(self, event: RoundEvent) -> None:
        if self._file is None:
            raise RuntimeError("MetricsLog.on_round_end called before on_begin")
        report = event.report
        record: dict[str, object] = {
            "round": event.state.round,
            "clients": list(report.clients),
            "num_examples": report.num_examples,
            "train": _metrics(report.train_metrics),
            "eval": _metrics(event.metrics),
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
            "seconds": round(report.seconds, 6),
            "skipped": list(report.skipped),
            "wall": round(event.elapsed, 6),
        }
        if event.privacy is not None:
            record["privacy"] = _metrics(event.privacy)
        if self.numerics:
            record["numerics"] = self.numerics
        if self._first and self.config is not None:
            record["config"] = self.config
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._first = False

    def close(self) -> None:
        """Close the file (also done at the end of the loop and on interrupt)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_interrupt(self, state: ServerState) -> None:
        self.close()

    def on_end(self, result: LoopResult) -> None:
        self.close()
