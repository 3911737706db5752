"""Experiment files: a TOML file whose keys are ``blazefl-fn run`` flags, with an optional
``[sweep]`` table of axes (``blazefl-fn run --config``, ``blazefl-fn sweep``).

A file's settings become command-line tokens for the ``run`` parser itself, so a value in a
file is checked by exactly the code that checks the flag, and gives the same message.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import attrs

from ..run.config import RunConfig
from ._flags import UsageError, build_parser

Scalar = bool | int | float | str
"""A value a file may give a setting (TOML tables, arrays and dates are not settings)."""

SWEEP_TABLE = "sweep"
# Set by the sweep for each cell (its own files, its output): a sweep file may not set them.
SWEEP_OWNED = frozenset({"metrics", "checkpoint_dir", "resume", "overwrite", "json"})
_NOT_KEYS = frozenset({"help", "config"})
_CONFIG_FIELDS = tuple(f.name for f in attrs.fields(RunConfig))


class UnreadableExperiment(Exception):
    """An experiment file that is missing, unreadable or not TOML (exit status 1)."""


@attrs.frozen
class Experiment:
    """An experiment file's settings and sweep axes, keys as flag names with ``_``.

    Attributes:
        path: the file, as given.
        settings: ``(key, value)`` of each top-level setting, in file order.
        axes: ``(key, values)`` of each ``[sweep]`` axis, in file order (empty: no sweep).
    """

    path: str
    settings: tuple[tuple[str, Scalar], ...]
    axes: tuple[tuple[str, tuple[Scalar, ...]], ...]


@attrs.frozen
class CellSpec:
    """One cell of a sweep: its axis values and the ``run`` tokens of its settings."""

    axes: tuple[tuple[str, Scalar], ...]
    tokens: tuple[str, ...]


def run_actions() -> dict[str, argparse.Action]:
    """The ``run`` command's options by destination (``clients_per_round``), the keys a file
    may set."""
    parser = build_parser()
    # argparse keeps its subcommands' parsers in a private action: found by its choices.
    found: Any = next(a for a in parser._actions if isinstance(a.choices, dict))  # pyright: ignore[reportPrivateUsage]
    run = cast(dict[str, argparse.ArgumentParser], found.choices)["run"]
    return {a.dest: a for a in run._actions if a.dest not in _NOT_KEYS and a.option_strings}  # pyright: ignore[reportPrivateUsage]


def _key(path: str, raw: str, known: Mapping[str, argparse.Action], owned: frozenset[str]) -> str:
    """``raw`` (``data-dir`` or ``data_dir``) as a destination, or a one-line refusal."""
    key = raw.replace("-", "_")
    if key in owned:
        raise UsageError(
            f"{path}: key '{raw}' is set by the sweep for each cell (its own files under --out)"
        )
    if key not in known:
        close = difflib.get_close_matches(key, [k for k in known if k not in owned], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"{path}: unknown key '{raw}' (not a run flag){hint}")
    return key


def _scalar(path: str, raw: str, value: object, where: str = "") -> Scalar:
    if isinstance(value, bool | int | float | str):
        return value
    kind = (
        "an array"
        if isinstance(value, list)
        else "a table"
        if isinstance(value, dict)
        else type(value).__name__
    )
    axes = "" if where or not isinstance(value, list) else f"; axes go in the [{SWEEP_TABLE}] table"
    raise UsageError(f"{path}: {where}'{raw}' needs one value, got {kind}{axes}")


def parse_experiment(path: str, text: str, *, sweep: bool) -> Experiment:
    """An experiment file's text, its keys checked against the ``run`` flags.

    Args:
        path: how messages name the file.
        text: the file's TOML.
        sweep: whether a ``[sweep]`` table is expected (``blazefl-fn sweep``) or refused
            (``run --config``); a sweep file may not set the keys each cell owns.

    Raises:
        UnreadableExperiment: not TOML.
        UsageError: an unknown key (naming the closest one), a key given twice, a value that
            is not one value, an empty or repeated axis, or a table out of place.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UnreadableExperiment(f"experiment file {path} is not TOML: {exc}") from None
    known = run_actions()
    owned = SWEEP_OWNED if sweep else frozenset[str]()
    table = document.pop(SWEEP_TABLE, None)
    settings: dict[str, Scalar] = {}
    for raw, value in document.items():
        key = _key(path, raw, known, owned)
        if key in settings:
            raise UsageError(f"{path}: '{raw}' is given twice (as '-' and '_' spellings)")
        settings[key] = _scalar(path, raw, value)
    axes: dict[str, tuple[Scalar, ...]] = {}
    if table is not None:
        if not sweep:
            raise UsageError(
                f"{path} has a [{SWEEP_TABLE}] table: run it with blazefl-fn sweep {path} --out DIR"
            )
        if not isinstance(table, dict):
            raise UsageError(f"{path}: '{SWEEP_TABLE}' must be a table of axes")
        for raw, values in cast(dict[str, object], table).items():
            key = _key(path, raw, known, owned)
            if key in settings or key in axes:
                raise UsageError(f"{path}: '{raw}' is both a setting and a [{SWEEP_TABLE}] axis")
            if not isinstance(values, list):
                raise UsageError(f"{path}: axis '{raw}' must be an array of values")
            items = [_scalar(path, raw, v, "a value of axis ") for v in cast(list[object], values)]
            if not items:
                raise UsageError(f"{path}: axis '{raw}' is empty; give it at least one value")
            repeated = [v for i, v in enumerate(items) if (type(v), v) in _typed(items[:i])]
            if repeated:
                raise UsageError(f"{path}: axis '{raw}' repeats the value {repeated[0]!r}")
            axes[key] = tuple(items)
    return Experiment(path, tuple(settings.items()), tuple(axes.items()))


def _typed(values: Sequence[Scalar]) -> set[tuple[type, Scalar]]:
    # 1 and 1.0 and True are equal in Python but different settings in a file.
    return {(type(v), v) for v in values}


def read_experiment(path: str, *, sweep: bool) -> Experiment:
    """`parse_experiment` of the file ``path``.

    Raises:
        UnreadableExperiment: the file is missing, unreadable or not TOML.
        UsageError: see `parse_experiment`.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnreadableExperiment(f"experiment file {path}: {reason}") from None
    return parse_experiment(path, text, sweep=sweep)


def tokens(settings: Sequence[tuple[str, Scalar]]) -> list[str]:
    """The ``run`` command-line tokens that give ``settings`` (``--clients=10``, ``--drop-last``).

    Raises:
        UsageError: a switch (``drop_last``) given other than true or false, or a boolean given
            to a flag that takes a value.
    """
    actions = run_actions()
    out: list[str] = []
    for key, value in settings:
        action = actions[key]
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch: present or absent
            if not isinstance(value, bool):
                raise UsageError(f"argument {flag}: is a switch, set it to true or false")
            if value:
                out.append(flag)
        elif isinstance(value, bool):
            raise UsageError(f"argument {flag}: expected a value, got the boolean {value!r}")
        else:
            # ``--lr=-1`` rather than ``--lr -1``: a value that starts with '-' stays a value.
            out.append(f"{flag}={value}")
    return out


def cells(experiment: Experiment) -> list[CellSpec]:
    """Every cell of the sweep's grid, the last axis varying fastest.

    Raises:
        UsageError: a setting's value is not one the flag takes (see `tokens`).
    """
    names = [name for name, _ in experiment.axes]
    grid = itertools.product(*(values for _, values in experiment.axes))
    specs: list[CellSpec] = []
    for values in grid:
        point = tuple(zip(names, values, strict=True))
        try:
            given = tokens([*experiment.settings, *point])
        except UsageError as exc:
            raise UsageError(f"{experiment.path}: {exc}") from None
        specs.append(CellSpec(point, tuple(given)))
    return specs


def resolve(tokens_: Sequence[str]) -> tuple[argparse.Namespace, RunConfig]:
    """The parsed ``run`` command line ``tokens_`` and the `RunConfig` it gives.

    Raises:
        UsageError: a flag's value is refused by the parser (its own message).
        ValueError: a value `RunConfig` refuses (its own message).
    """
    args = build_parser().parse_args(["run", *tokens_])
    return args, RunConfig(**{name: getattr(args, name) for name in _CONFIG_FIELDS})
