"""A sweep's plan: the cells of an experiment file's grid, each resolved and checked as ``run``
would check it, and named by a hash of the settings that fix its bits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import attrs

from ..run.config import RunConfig
from ..run.simulate import RESUMABLE_CHANGES, config_dict
from ._experiment_file import cells, read_experiment, resolve
from ._flags import UsageError


@attrs.frozen
class Cell:
    """One run of a sweep.

    Attributes:
        name: its directory under ``--out``: a hash of its fixed settings and axis values.
        label: its axis values as ``name=value`` words.
        tokens: the ``run`` command line of its settings.
        config: the settings it resolves to.
        cpus: CPUs it keeps busy (its executor's local workers times their threads).
    """

    name: str
    label: str
    tokens: tuple[str, ...]
    config: RunConfig
    cpus: int


def fixed_settings(config: RunConfig) -> dict[str, Any]:
    """The settings of ``config`` that a resumed run may not change (they fix its bits)."""
    return {k: v for k, v in config_dict(config).items() if k not in RESUMABLE_CHANGES}


def cell_name(config: RunConfig, axes: Sequence[tuple[str, object]]) -> str:
    """A cell's directory name: 12 hex digits of the SHA-256 of its fixed settings and axis
    values (an axis over a resumable setting, e.g. ``executor``, still names its own cells)."""
    text = json.dumps({"fixed": fixed_settings(config), "axes": list(axes)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cpus(config: RunConfig) -> int:
    local = config.executor in ("threads", "processes") or (
        config.executor == "ray" and config.ray_address is None
    )
    return (config.workers if local else 1) * config.threads


def plan(path: str) -> tuple[list[Cell], list[str]]:
    """Every cell of the experiment file ``path``, each checked as ``run`` would check it, and
    the names of its axes.

    Raises:
        UnreadableExperiment: the file is missing or not TOML.
        UsageError: a bad key or value (the message names the cell when an axis value is bad).
    """
    experiment = read_experiment(path, sweep=True)
    if not experiment.axes:
        raise UsageError(f"{path} has no [sweep] table of axes; run one config with run --config")
    planned: list[Cell] = []
    for spec in cells(experiment):
        label = " ".join(f"{k}={v}" for k, v in spec.axes)
        try:
            args, config = resolve(spec.tokens)
        except (UsageError, ValueError, TypeError) as exc:
            raise UsageError(f"{path}: cell {label}: {exc}") from None
        if args.checkpoint_every < 1:
            raise UsageError(
                f"{path}: checkpoint-every must be an integer >= 1, got {args.checkpoint_every}"
            )
        name = cell_name(config, spec.axes)
        planned.append(Cell(name, label, spec.tokens, config, _cpus(config)))
    return planned, [name for name, _ in experiment.axes]
