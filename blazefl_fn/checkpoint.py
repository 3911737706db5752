"""Checkpoints: a run's full state saved atomically and loaded without executing code.

A checkpoint is one file written with `torch.save` and read back with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, so a
tampered file cannot run code. It holds the server state (parameters, completed rounds and the
algorithm's ``aux`` state, flattened to tensors and plain values), the run's configuration as a
JSON object (the run key is derived from its seed), and the SHA-256 digest of the parameters,
checked on load.

Writes go to a temporary file in the same directory, are flushed and fsynced, then renamed over
the old checkpoint (`os.replace`), so the file is always either the previous checkpoint or the
complete new one, never a partial write.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import attrs
import torch

from ._atomic import replaced_atomically
from .records import ServerState
from .runner import Callback, LoopResult, RoundEvent
from .tree import digest

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointWriter",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
"""The file name a checkpoint has inside its directory."""
_FORMAT = "blazefl_fn.checkpoint"
_VERSION = 1


@attrs.frozen(eq=False)
class Checkpoint:
    """A loaded checkpoint: the state and the configuration it was written with."""

    state: ServerState
    config: Mapping[str, Any]
    numerics: Mapping[str, Any] = attrs.field(factory=dict[str, Any])


def _path(location: str | os.PathLike[str]) -> Path:
    """The checkpoint file: ``location`` itself, or `CHECKPOINT_NAME` inside a directory."""
    path = Path(location)
    return path / CHECKPOINT_NAME if path.is_dir() else path


# -- aux state as leaves ------------------------------------------------------------------------

_Scalar = (int, float, bool, str, type(None))


def _flatten(obj: object, where: str, leaves: list[object]) -> str:
    """Append ``obj``'s leaves to ``leaves``; return a description of its structure."""
    if isinstance(obj, torch.Tensor):
        # Copied to the CPU (not cloned where it lies): a GPU state is not doubled on the GPU.
        leaves.append(obj.detach().to("cpu", copy=True))
        return "T"
    if isinstance(obj, _Scalar):
        leaves.append(obj)
        return "S"
    if isinstance(obj, Mapping):
        mapping = cast(Mapping[object, object], obj)
        names = sorted(mapping, key=str)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"aux state at {where}: mapping keys must be str, got {names!r}")
        inner = ",".join(f"{n}:{_flatten(mapping[n], f'{where}.{n}', leaves)}" for n in names)
        return "{" + inner + "}"
    if isinstance(obj, tuple | list):
        items = cast(tuple[object, ...] | list[object], obj)
        inner = ",".join(_flatten(v, f"{where}[{i}]", leaves) for i, v in enumerate(items))
        return "(" + inner + ")"
    if attrs.has(type(obj)):
        fields = attrs.fields(type(obj))
        inner = ",".join(
            f"{f.name}:{_flatten(getattr(obj, f.name), f'{where}.{f.name}', leaves)}"
            for f in fields
        )
        return f"{type(obj).__qualname__}<{inner}>"
    raise TypeError(
        f"aux state at {where}: cannot checkpoint a {type(obj).__name__}; use tensors, plain "
        f"scalars, str-keyed mappings, tuples, lists and attrs records"
    )


class _Mismatch(Exception):
    """The stored aux structure does not fit the algorithm's."""


class _BadLeaf(Exception):
    """A stored tensor leaf differs from the template's in shape or dtype (its index)."""


@attrs.define
class _Reader:
    """A cursor over a stored `_flatten` description and its leaves, walked along the
    algorithm's template (so the template, not the file, bounds the recursion)."""

    text: str
    leaves: list[object]
    pos: int = 0
    taken: int = 0

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise _Mismatch
        self.pos += len(token)

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def leaf(self) -> object:
        if self.taken >= len(self.leaves):
            raise _Mismatch
        self.taken += 1
        return self.leaves[self.taken - 1]


def _fit(template: object, reader: _Reader, *, client_state: bool = False) -> object:
    """The stored aux state: ``template``'s structure filled with the stored leaves.

    One exception to "the same structure": an empty mapping inside a tuple or list (a
    client's stored state, empty until it first takes part, `blazefl_fn.client_state`) takes
    the tensors the checkpoint stored there.
    """
    if isinstance(template, torch.Tensor):
        reader.expect("T")
        index = reader.taken
        value = reader.leaf()
        if (
            not isinstance(value, torch.Tensor)
            or value.shape != template.shape
            or value.dtype != template.dtype
        ):
            raise _BadLeaf(index)
        return value
    if isinstance(template, _Scalar):
        reader.expect("S")
        return reader.leaf()
    if isinstance(template, Mapping):
        mapping = cast(Mapping[str, object], template)
        reader.expect("{")
        if not mapping and client_state:
            return _client_tree(reader)
        names = sorted(mapping, key=str)
        rebuilt: dict[str, object] = {}
        for k, name in enumerate(names):
            reader.expect(f"{name}:" if k == 0 else f",{name}:")
            rebuilt[name] = _fit(mapping[name], reader)
        reader.expect("}")
        return {n: rebuilt[n] for n in mapping}
    if isinstance(template, tuple | list):
        items = cast(tuple[object, ...] | list[object], template)
        reader.expect("(")
        values: list[object] = []
        for k, item in enumerate(items):
            if k:
                reader.expect(",")
            values.append(_fit(item, reader, client_state=True))
        reader.expect(")")
        return tuple(values) if isinstance(template, tuple) else values
    fields = attrs.fields(type(template))
    reader.expect(f"{type(template).__qualname__}<")
    values_by_name: dict[str, object] = {}
    for k, f in enumerate(fields):
        reader.expect(f"{f.name}:" if k == 0 else f",{f.name}:")
        values_by_name[f.name] = _fit(getattr(template, f.name), reader)
    reader.expect(">")
    return attrs.evolve(template, **values_by_name)


def _client_tree(reader: _Reader) -> dict[str, torch.Tensor]:
    """The ``name:T,...}`` rest of a stored client tree (after its ``{``)."""
    out: dict[str, torch.Tensor] = {}
    while not reader.peek("}"):
        if out:
            reader.expect(",")
        end = reader.text.find(":T", reader.pos)
        if end <= reader.pos:
            raise _Mismatch
        name = reader.text[reader.pos : end]
        reader.pos = end + 2
        value = reader.leaf()
        if not isinstance(value, torch.Tensor) or name in out:
            raise _Mismatch
        out[name] = value
    reader.expect("}")
    return out


# -- save / load ------------------------------------------------------------------------------


def save_checkpoint(
    location: str | os.PathLike[str],
    state: ServerState,
    config: Mapping[str, Any],
    numerics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state`` and ``config`` atomically to ``location`` (a directory or a file path).

    Args:
        location: a directory (created if missing; the file is `CHECKPOINT_NAME` in it) or the
            path of the file itself.
        state: the server state to save; its tensors are copied, not mutated.
        config: the run's configuration, JSON-serialisable.
        numerics: how the run computed (`blazefl_fn.portable.numerics`: portable or not, the
            CPU capability in use), JSON-serialisable; stored for the record.

    Returns:
        The path of the checkpoint file.

    Raises:
        TypeError: ``config`` is not JSON-serialisable or ``state.aux`` holds other types.
        OSError: the file could not be written (any temporary file is removed).

    Examples:
        >>> import tempfile, torch
        >>> state = ServerState(params={"w": torch.ones(2)}, round=3)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = save_checkpoint(d, state, {"seed": 0})
        ...     loaded = load_checkpoint(path)
        >>> loaded.state.round, loaded.config
        (3, {'seed': 0})
    """
    path = Path(location)
    if path.suffix != ".pt":
        path.mkdir(parents=True, exist_ok=True)
        path = path / CHECKPOINT_NAME
    leaves: list[object] = []
    structure = _flatten(state.aux, "aux", leaves)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "config": json.dumps(dict(config), sort_keys=True),
        "numerics": json.dumps(dict(numerics or {}), sort_keys=True),
        "round": state.round,
        "params": {name: t.detach().to("cpu", copy=True) for name, t in state.params.items()},
        "params_sha256": digest(state.params),
        "aux_structure": structure,
        "aux_leaves": leaves,
    }
    with replaced_atomically(path) as tmp:
        torch.save(payload, tmp)
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about foreign pickle protocols before refusing them; the refusal
            # below is the message that matters.
            warnings.simplefilter("ignore")
            payload: object = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        # torch's messages run to several sentences; the first says what went wrong.
        text = str(e).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {first}") from e
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:  # pyright: ignore[reportUnknownMemberType]
        raise ValueError(f"{path} is not a blazefl_fn checkpoint")
    data = cast(dict[str, Any], payload)
    if data.get("version") != _VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {data.get('version')!r}; this blazefl_fn "
            f"reads version {_VERSION}"
        )
    return data


def read_config(location: str | os.PathLike[str]) -> dict[str, Any]:
    """The configuration stored in the checkpoint at ``location`` (a directory or file).

    Raises:
        FileNotFoundError: there is no checkpoint there.
        ValueError: the file is not a readable blazefl_fn checkpoint.
    """
    path = _path(location)
    config = json.loads(_read(path)["config"])
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint {path}: the stored config is not an object")
    return cast(dict[str, Any], config)


def load_checkpoint(location: str | os.PathLike[str], aux_template: object = None) -> Checkpoint:
    """Load the checkpoint at ``location`` (a directory or file).

    Args:
        location: the checkpoint directory or file.
        aux_template: an ``aux`` value of the algorithm's (e.g. ``algorithm.init(key).aux``),
            whose structure the stored aux state must have; None accepts only an empty aux
            (``{}``).

    Raises:
        FileNotFoundError: there is no checkpoint there.
        ValueError: the file is corrupt or truncated, its parameters do not match their stored
            digest, or its aux state does not fit ``aux_template``.
    """
    path = _path(location)
    data = _read(path)
    params = data.get("params")
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor)
        for k, v in cast(dict[object, object], params).items()
    ):
        raise ValueError(f"checkpoint {path}: malformed parameters")
    params = cast(dict[str, torch.Tensor], params)
    if digest(params) != data.get("params_sha256"):
        raise ValueError(f"checkpoint {path}: the parameters do not match their stored digest")
    template: object = {} if aux_template is None else aux_template
    expected_leaves: list[object] = []
    expected = _flatten(template, "aux", expected_leaves)
    stored = data.get("aux_structure")
    raw_leaves = data.get("aux_leaves")
    leaves = cast(list[object], raw_leaves) if isinstance(raw_leaves, list) else None
    try:
        if leaves is None:
            raise _Mismatch
        if not isinstance(stored, str):
            raise _Mismatch
        reader = _Reader(stored, leaves)
        aux = _fit(template, reader)
        if reader.pos != len(stored) or reader.taken != len(leaves):
            raise _Mismatch
    except _Mismatch:
        raise ValueError(
            f"checkpoint {path}: its algorithm state has structure {stored!r}, the algorithm "
            f"expects {expected!r}"
        ) from None
    except _BadLeaf as exc:
        raise ValueError(
            f"checkpoint {path}: aux leaf {exc} has the wrong shape or dtype"
        ) from None
    round_index = data.get("round")
    if not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"checkpoint {path}: bad round {round_index!r}")
    state = ServerState(params=params, round=round_index, aux=cast(Any, aux))
    numerics = json.loads(data.get("numerics", "{}"))
    return Checkpoint(state=state, config=json.loads(data["config"]), numerics=numerics)


class CheckpointWriter(Callback):
    """Saves the state every ``every`` rounds, after the last round, and on KeyboardInterrupt.

    Args:
        location: the checkpoint directory (or file path ending in ``.pt``).
        every: rounds between checkpoints (>= 1).
        config: the run's configuration, stored with every checkpoint.
        numerics: how the run computes (portable or not, CPU capability), stored too.
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        every: int,
        config: Mapping[str, Any],
        numerics: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint every must be an integer >= 1, got {every!r}")
        self.location = location
        self.every = every
        self.config = dict(config)
        self.numerics = dict(numerics or {})
        self.saved_round: int | None = None
        self._rounds = 0

    def _save(self, state: ServerState) -> None:
        save_checkpoint(self.location, state, self.config, self.numerics)
        self.saved_round = state.round

    def on_begin(self, state: ServerState, rounds: int) -> None:
        self._rounds = rounds

    def on_round_end(self, event: RoundEvent) -> None:
        if event.state.round % self.every == 0 or event.state.round == self._rounds:
            self._save(event.state)

    def on_interrupt(self, state: ServerState) -> None:
        if self.saved_round != state.round:
            self._save(state)

    def on_end(self, result: LoopResult) -> None:
        if self.saved_round != result.state.round:
            self._save(result.state)
