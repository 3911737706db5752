"""Checkpoints: a run's full state saved atomically and loaded without executing code.

A checkpoint is one file written with `torch.save` and read back with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, so a
tampered file cannot run code. It holds the server state (parameters, completed rounds and the
algorithm's ``aux`` state, flattened to tensors and plain values), the run's configuration as a
JSON object (the run key is derived from its seed), the version of the random streams it ran on
(`blazefl_fn.keys.STREAMS_VERSION`: a run is never continued on other streams), the SHA-256
digest of the parameters, and a SHA-256 checksum of the whole content (configuration, round,
parameters and aux state), all checked before anything is used: a damaged checkpoint, or one
edited without recomputing the checksum, is refused with a one-line message, never resumed
from. The checksum stops corruption, not someone who rewrites the file and recomputes it:
against that every field's structure is checked (the parameters against the model, each
client's stored state against the algorithm's `blazefl_fn.server.client_state.StateLayout`,
allocations bounded by the file's size), not its values: the file is not signed.

Writes go to a temporary file in the same directory, are flushed and fsynced, then renamed over
the old checkpoint (`os.replace`), so the file is always either the previous checkpoint or the
complete new one, never a partial write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, cast, overload

import attrs
import torch
from typing_extensions import TypeVar

from .._files import holding, replaced_atomically
from ..keys import STREAMS_VERSION
from ..records import ServerState
from ..tree import digest
from ._aux_leaves import SCALARS, BadLeaf, Mismatch, Reader, fit, flatten
from .loop import Callback, LoopResult, RoundEvent

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointWriter",
    "StoredCheckpoint",
    "check_fresh",
    "checkpoint_file",
    "load_checkpoint",
    "locked",
    "read_checkpoint",
    "read_config",
    "save_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
"""The file name a checkpoint has inside its directory."""
_FORMAT = "blazefl_fn.checkpoint"
# 3: the stream version is recorded (files of version 2 ran on stream version 1).
_VERSION = 3


# The loaded state's aux: the type of the ``aux_template`` it was loaded with. Covariant and
# defaulting to object, as `ServerState`'s: a bare ``Checkpoint`` means any aux.
Aux = TypeVar("Aux", covariant=True, default=object)
A = TypeVar("A")


@attrs.frozen(eq=False)
class Checkpoint(Generic[Aux]):
    """A loaded checkpoint: the state and the configuration it was written with.

    Generic in the state's ``aux``, which `load_checkpoint` rebuilds in the structure of its
    ``aux_template``: ``load_checkpoint(path, aux_template=algorithm.init(key).aux)`` is a
    ``Checkpoint[A]`` for an ``Algorithm[Data, A]``, so its ``state`` goes back into the
    algorithm's rounds without a cast.
    """

    state: ServerState[Aux]
    config: Mapping[str, Any]
    numerics: Mapping[str, Any] = attrs.field(factory=dict[str, Any])


def checkpoint_file(location: str | os.PathLike[str]) -> Path:
    """The checkpoint file a location names: ``location`` itself if it ends in ``.pt`` (and is
    not a directory), else `CHECKPOINT_NAME` inside it.

    Examples:
        >>> checkpoint_file("runs/ck").as_posix(), checkpoint_file("runs/a.pt").as_posix()
        ('runs/ck/checkpoint.pt', 'runs/a.pt')
    """
    path = Path(location)
    return path / CHECKPOINT_NAME if path.is_dir() or path.suffix != ".pt" else path


def _content_sha256(payload: Mapping[str, Any]) -> str:
    """SHA-256 over everything a checkpoint restores: its header fields and every leaf."""
    h = hashlib.sha256()
    header = json.dumps(
        [payload[k] for k in ("format", "version", "streams", "config", "numerics", "round")]
        + [payload["params_sha256"], payload["aux_structure"]]
    )
    h.update(header.encode("utf-8"))
    leaves = cast(list[object], payload["aux_leaves"])
    tensors = {str(i): v for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)}
    scalars = [[i, v] for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)]
    h.update(digest(tensors).encode("ascii"))
    h.update(json.dumps(scalars).encode("utf-8"))
    h.update(digest(cast(dict[str, torch.Tensor], payload["params"])).encode("ascii"))
    return h.hexdigest()


def locked(location: str | os.PathLike[str]) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of the checkpoint file ``location`` names (`checkpoint_file`): one writer
    per checkpoint, however its location is spelled (``ck``, ``ck/``, ``ck/checkpoint.pt``).

    Raises:
        OutputLockedError: another process, or another thread of this one, holds it (the
            message names the process).
    """
    return holding(checkpoint_file(location), f"checkpoint {location}")


def check_fresh(
    location: str | os.PathLike[str],
    resume: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Refuse to write checkpoints over one that the run does not continue from.

    A run may write into ``location`` if it holds no checkpoint, if the run resumes from that
    very checkpoint, or if ``overwrite`` is set.

    Raises:
        FileExistsError: ``location`` holds a checkpoint this run would replace.
    """
    path = checkpoint_file(location)
    if overwrite or not path.exists():
        return
    if resume is not None and checkpoint_file(resume).resolve() == path.resolve():
        return
    raise FileExistsError(
        f"{location} already holds a checkpoint; continue it (--resume {location}) or replace "
        "it (--overwrite)"
    )


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
    path = checkpoint_file(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves: list[object] = []
    structure = flatten(state.aux, "aux", leaves)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "streams": STREAMS_VERSION,
        "config": json.dumps(dict(config), sort_keys=True),
        "numerics": json.dumps(dict(numerics or {}), sort_keys=True),
        "round": state.round,
        "params": {name: t.detach().to("cpu", copy=True) for name, t in state.params.items()},
        "params_sha256": digest(state.params),
        "aux_structure": structure,
        "aux_leaves": leaves,
    }
    payload["content_sha256"] = _content_sha256(payload)
    with replaced_atomically(path, "checkpoint") as tmp:
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
    except (
        RuntimeError,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
    ) as e:
        # torch's messages run to several sentences; the first says what went wrong.
        text = str(e).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {first}") from e
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:  # pyright: ignore[reportUnknownMemberType]
        raise ValueError(f"{path} is not a blazefl_fn checkpoint")
    data = cast(dict[str, Any], payload)
    # Compared as plain ints only: a forged tensor in either field is refused, not compared
    # elementwise (which raises).
    version: object = data.get("version")
    if type(version) is not int or version not in (2, _VERSION):
        shown = repr(version) if type(version) is int else f"a {type(version).__name__}"
        raise ValueError(
            f"checkpoint {path} has format version {shown}; this blazefl_fn reads version "
            f"{_VERSION}"
        )
    # Format version 2 predates the field: its runs drew from stream version 1. A missing
    # field is named by `_check_fields`.
    streams: object = 1 if version == 2 else data.get("streams", STREAMS_VERSION)
    if type(streams) is not int or streams != STREAMS_VERSION:
        shown = repr(streams) if type(streams) is int else f"a {type(streams).__name__}"
        raise ValueError(
            f"checkpoint {path} ran on random streams version {shown} and this blazefl_fn "
            f"draws from version {STREAMS_VERSION} (every draw uses the whole 128-bit key): "
            "resuming would continue on other streams, so start the run again (CHANGELOG.md)"
        )
    _check_fields(path, data)
    if _content_sha256(data) != data["content_sha256"]:
        raise ValueError(
            f"checkpoint {path}: its content does not match its checksum (the file was edited "
            "or damaged)"
        )
    return data


def _json_object(path: Path, data: Mapping[str, Any], field: str) -> dict[str, Any]:
    try:
        value: object = json.loads(data[field])
    except (json.JSONDecodeError, RecursionError):  # malformed, or nested past the stack
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint {path}: field {field!r} is not a JSON object")
    return cast(dict[str, Any], value)


def _plain(value: object) -> bool:
    """A dense tensor that owns exactly its storage, as `save_checkpoint` writes them. Anything
    else (an expanded zero-stride view, a sparse or quantized tensor) is refused before it is
    hashed: making it contiguous could allocate far more than the file holds."""
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.requires_grad
        and value.is_contiguous()
        and value.storage_offset() == 0
        and value.untyped_storage().nbytes() == value.numel() * value.element_size()
    )


def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.layout} tensor that does not own exactly its storage"
    return type(value).__name__


def _check_fields(path: Path, data: Mapping[str, Any]) -> None:
    """Refuse a payload whose fields are missing or of the wrong type (one line naming it)."""
    kinds: dict[str, type | tuple[type, ...]] = {
        "streams": int,
        "config": str,
        "numerics": str,
        "round": int,
        "params": dict,
        "params_sha256": str,
        "aux_structure": str,
        "aux_leaves": list,
        "content_sha256": str,
    }
    for field, kind in kinds.items():
        if field not in data:
            raise ValueError(f"checkpoint {path}: field {field!r} is missing")
        value: object = data[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"checkpoint {path}: field {field!r} has type {type(value).__name__}")
    if data["round"] < 0:
        raise ValueError(f"checkpoint {path}: bad round {data['round']!r}")
    params = cast(dict[object, object], data["params"])
    for name, value in params.items():
        if not isinstance(name, str) or not _plain(value):
            raise ValueError(f"checkpoint {path}: malformed parameter {name!r}")
    leaves = cast(list[object], data["aux_leaves"])
    for i, leaf in enumerate(leaves):
        if not (isinstance(leaf, SCALARS) or _plain(leaf)):
            raise ValueError(f"checkpoint {path}: aux leaf {i} is a {_kind(leaf)}")
    _json_object(path, data, "config")
    _json_object(path, data, "numerics")


def read_config(location: str | os.PathLike[str]) -> dict[str, Any]:
    """The configuration stored in the checkpoint at ``location`` (a directory or file).

    Raises:
        FileNotFoundError: there is no checkpoint there.
        ValueError: the file is not a readable blazefl_fn checkpoint.
    """
    return read_checkpoint(location).config


@attrs.frozen(eq=False)
class StoredCheckpoint:
    """A checkpoint file read and verified once (`read_checkpoint`): its config at once, its
    state on `load`, so that checking a resume's settings and restoring its state read and
    hash the file one time.

    Attributes:
        path: the checkpoint file.
        payload: the verified contents (checksum and field types checked).
    """

    path: Path
    payload: Mapping[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The stored run configuration (`blazefl_fn.run.simulate.config_dict`'s form)."""
        return _json_object(self.path, self.payload, "config")

    @overload
    def load(
        self, aux_template: None = None, params_template: Mapping[str, torch.Tensor] | None = None
    ) -> Checkpoint[Mapping[str, torch.Tensor]]: ...
    @overload
    def load(
        self, aux_template: A, params_template: Mapping[str, torch.Tensor] | None = None
    ) -> Checkpoint[A]: ...
    def load(
        self, aux_template: object = None, params_template: Mapping[str, torch.Tensor] | None = None
    ) -> Checkpoint[Any]:
        """The stored state, checked against the templates (see `load_checkpoint`)."""
        return _restore(self.path, self.payload, aux_template, params_template)


def read_checkpoint(location: str | os.PathLike[str]) -> StoredCheckpoint:
    """Read and verify the checkpoint at ``location`` (a directory or file) once.

    Raises:
        FileNotFoundError: there is no checkpoint there.
        ValueError: the file is corrupt or truncated, a field is missing or of the wrong type,
            or its content does not match its checksum.

    Examples:
        >>> import tempfile, torch
        >>> from blazefl_fn.records import ServerState
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_checkpoint(d, ServerState({"w": torch.ones(2)}, round=3), {"seed": 0})
        ...     stored = read_checkpoint(d)
        ...     stored.config, stored.load().state.round
        ({'seed': 0}, 3)
    """
    path = checkpoint_file(location)
    return StoredCheckpoint(path, _read(path))


@overload
def load_checkpoint(
    location: str | os.PathLike[str],
    aux_template: None = None,
    params_template: Mapping[str, torch.Tensor] | None = None,
) -> Checkpoint[Mapping[str, torch.Tensor]]: ...
@overload
def load_checkpoint(
    location: str | os.PathLike[str],
    aux_template: A,
    params_template: Mapping[str, torch.Tensor] | None = None,
) -> Checkpoint[A]: ...
def load_checkpoint(
    location: str | os.PathLike[str],
    aux_template: object = None,
    params_template: Mapping[str, torch.Tensor] | None = None,
) -> Checkpoint[Any]:
    """Load the checkpoint at ``location`` (a directory or file), verified before use.

    Args:
        location: the checkpoint directory or file.
        aux_template: an ``aux`` value of the algorithm's (e.g. ``algorithm.init(key).aux``),
            whose structure the stored aux state must have; None accepts only an empty aux
            (``{}``).
        params_template: the model's parameters (e.g. ``algorithm.init(key).params``), whose
            names, shapes and dtypes the stored ones must have; None checks only their digest.

    Returns:
        The checkpoint, typed by ``aux_template``: its state's ``aux`` is rebuilt in the
        template's structure, of the template's type (the attrs records, dicts, tuples, lists,
        tensors and client stores algorithms keep; another mapping class comes back as a
        dict, a named tuple as a tuple). With an ``Algorithm[Data, A]``,
        ``load_checkpoint(path, algorithm.init(key).aux)`` is a ``Checkpoint[A]``; without a
        template, a ``Checkpoint[Mapping[str, torch.Tensor]]`` (the empty aux).

    Raises:
        FileNotFoundError: there is no checkpoint there.
        ValueError: the file is corrupt or truncated, a field is missing or of the wrong type,
            its content does not match its checksum, its parameters do not fit
            ``params_template``, or its aux state does not fit ``aux_template``.
    """
    return read_checkpoint(location).load(aux_template, params_template)


def _restore(
    path: Path,
    data: Mapping[str, Any],
    aux_template: object,
    params_template: Mapping[str, torch.Tensor] | None,
) -> Checkpoint[Any]:
    params = cast(dict[str, torch.Tensor], data["params"])
    if digest(params) != data["params_sha256"]:
        raise ValueError(f"checkpoint {path}: the parameters do not match their stored digest")
    if params_template is not None:
        _check_params(path, params, params_template)
    template: object = {} if aux_template is None else aux_template
    expected_leaves: list[object] = []
    expected = flatten(template, "aux", expected_leaves)
    stored = data.get("aux_structure")
    raw_leaves = data.get("aux_leaves")
    leaves = cast(list[object], raw_leaves) if isinstance(raw_leaves, list) else None
    try:
        if leaves is None:
            raise Mismatch
        if not isinstance(stored, str):
            raise Mismatch
        reader = Reader(stored, leaves)
        aux = fit(template, reader)
        if reader.pos != len(stored) or reader.taken != len(leaves):
            raise Mismatch
    except Mismatch:
        if "Store" in expected and isinstance(stored, str) and "Store" not in stored:
            raise ValueError(
                f"checkpoint {path}: it keeps every client's state in a tuple, as blazefl_fn did "
                "before client state moved to a ClientStore; this version cannot continue it "
                "(start the run again)"
            ) from None
        raise ValueError(
            f"checkpoint {path}: its algorithm state has structure {_short(stored)}, the "
            f"algorithm expects {_short(expected)}"
        ) from None
    except BadLeaf as exc:
        raise ValueError(
            f"checkpoint {path}: aux leaf {exc} has the wrong shape or dtype"
        ) from None
    except ValueError as exc:
        # A stored client state that is not laid out as the algorithm keeps it.
        raise ValueError(f"checkpoint {path}: {exc}") from None
    state = ServerState(params=params, round=data["round"], aux=cast(Any, aux))
    return Checkpoint(
        state=state,
        config=_json_object(path, data, "config"),
        numerics=_json_object(path, data, "numerics"),
    )


def _check_params(
    path: Path, params: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]
) -> None:
    missing = sorted(set(template) - set(params))
    extra = sorted(set(params) - set(template))
    if missing or extra:
        raise ValueError(
            f"checkpoint {path}: its parameters do not fit the model (missing {missing}, "
            f"unexpected {extra})"
        )
    for name in sorted(template):
        stored, wanted = params[name], template[name]
        if stored.shape != wanted.shape or stored.dtype != wanted.dtype:
            raise ValueError(
                f"checkpoint {path}: parameter {name!r} is {stored.dtype} "
                f"{tuple(stored.shape)}, the model's is {wanted.dtype} {tuple(wanted.shape)}"
            )


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


def _short(structure: object, limit: int = 240) -> str:
    """A structure description for a one-line message (a store's can be megabytes long)."""
    text = repr(structure)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
