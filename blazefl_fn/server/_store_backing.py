"""The memory budget and spill files behind a `blazefl_fn.server._client_store.ClientStore`.

A store and every version made from it share one `Backing`: the packed buffer of each stored
tree (a `Record`), the bytes they hold in memory against the budget, and the files the oldest
ones were spilled to. Spill files are written and read through checked calls: a full disk, a
file-size limit or a truncated file is a `SpillError` naming the directory, never a silent
short write or a SIGBUS from a mapping of a truncated file.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading
import weakref
from typing import Any, final

import attrs
import torch

from .._files import STORE_PREFIX, OwnedDir, owned_dir, remove_dead_owners
from ..errors import SpillError
from ..tree import Params, TreeSpec, flatten, unflatten

__all__ = ["Backing", "Record", "SpillError"]


def _where(path: str) -> str:
    return f"client-state spill directory {os.path.dirname(path)}"


def _write_spill(path: str, buffer: torch.Tensor) -> None:
    """Write ``buffer`` to ``path`` in full, or raise `SpillError` (nothing left at ``path``).

    Written to a temporary name, checked against its length, then renamed: a reader never sees
    half a file, and a full disk or a file-size limit (``ulimit -f``) is an error here, not a
    short file found rounds later.
    """
    data = buffer.numpy().data.cast("B")
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            written = f.write(data)
            f.flush()
            size = os.fstat(f.fileno()).st_size
        if written != len(data) or size != len(data):
            raise SpillError(
                f"{_where(path)}: wrote {size} of {len(data)} bytes of {os.path.basename(path)} "
                "(disk full or a file-size limit?)"
            )
        os.replace(tmp, path)
    except SpillError:
        raise
    except OSError as exc:
        raise SpillError(
            f"{_where(path)}: cannot write {os.path.basename(path)}: {exc.strerror or exc}"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _read_spill(path: str, nbytes: int) -> torch.Tensor:
    """The ``nbytes`` of ``path`` read into memory, or `SpillError` if the file is short.

    Read, not mapped: a mapping of a file that someone truncates meanwhile ends the process
    with SIGBUS at the first access past the new end.
    """
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = out.numpy().data.cast("B")
    got = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except OSError as exc:
        raise SpillError(
            f"{_where(path)}: cannot read {os.path.basename(path)}: {exc.strerror or exc}"
        ) from None
    if got != nbytes:
        raise SpillError(
            f"{_where(path)}: {os.path.basename(path)} holds {got} of its {nbytes} bytes "
            "(truncated or replaced while the run used it)"
        )
    return out


@attrs.define(eq=False)
class Slot:
    """Where one stored tree lies: a buffer in memory, or a file (``path``) once spilled."""

    serial: int
    nbytes: int
    buffer: torch.Tensor | None
    path: str | None = None


@final
class Record:
    """One client's stored tree, packed; immutable in value, movable to disk by its backing."""

    __slots__ = ("__weakref__", "devices", "slot", "spec")

    def __init__(self, slot: Slot, spec: TreeSpec, devices: tuple[torch.device, ...]) -> None:
        self.slot = slot
        self.spec = spec
        self.devices = devices


def _release(backing: Backing, slot: Slot) -> None:
    backing.release(slot)


def _remove_dir(directory: OwnedDir, owner: int) -> None:
    # A forked child that exits normally must not delete its parent's spill files.
    if os.getpid() == owner:
        directory.remove()


class Backing:
    """The memory budget and spill files shared by a store and every version made from it."""

    def __init__(self, budget: int | None, spill_dir: str | None) -> None:
        self.budget = budget
        self.spill_dir = spill_dir
        # Re-entrant: a record's finalizer may run (garbage collection) while this thread
        # holds the lock.
        self._lock = threading.RLock()
        self._resident: collections.OrderedDict[int, weakref.ref[Record]] = (
            collections.OrderedDict()
        )
        self._serials = itertools.count()
        self.memory_bytes = 0
        self.spilled_bytes = 0
        self.spilled_files = 0
        self._dir: OwnedDir | None = None
        # Shared by every record of one layout: a client's state has the same layout each time.
        self._layouts: dict[tuple[TreeSpec, tuple[torch.device, ...]], Any] = {}
        # A forked child that exits normally must not delete its parent's spill files.
        self._pid = os.getpid()
        if budget is not None:
            # Spill directories of runs that were killed (SIGKILL runs no cleanup).
            remove_dead_owners(STORE_PREFIX, spill_dir)

    def record(self, params: Params) -> Record:
        """``params`` packed into a new record, spilling older ones beyond the budget."""
        buffer, spec = flatten(params)
        return self.adopt(buffer, spec, tuple(params[name].device for name in spec.names))

    def adopt(
        self, buffer: torch.Tensor, spec: TreeSpec, devices: tuple[torch.device, ...]
    ) -> Record:
        """A new record holding ``buffer`` (packed as ``spec`` says), taken as it is."""
        with self._lock:
            spec, devices = self._layouts.setdefault((spec, devices), (spec, devices))
            slot = Slot(next(self._serials), int(buffer.numel()), buffer)
            record = Record(slot, spec, devices)
            weakref.finalize(record, _release, self, slot)
            self._resident[slot.serial] = weakref.ref(record)
            self.memory_bytes += slot.nbytes
            self._enforce()
        return record

    def load(self, record: Record) -> dict[str, torch.Tensor]:
        """The tree ``record`` holds (views of one buffer, on the devices it came from)."""
        tree = unflatten(self.buffer(record), record.spec)
        return {
            name: t if device.type == "cpu" else t.to(device)
            for (name, t), device in zip(tree.items(), record.devices, strict=True)
        }

    def buffer(self, record: Record, *, copy: bool = True) -> torch.Tensor:
        """A copy of ``record``'s packed bytes (read from its file, if spilled); with
        ``copy=False``, an in-memory record's own buffer, for a reader that only reads."""
        with self._lock:
            slot = record.slot
            buffer = slot.buffer
            if buffer is not None:
                if slot.serial in self._resident:  # not a tree of empty tensors
                    self._resident.move_to_end(slot.serial)
                # A copy, as a spilled tree's read is: a reader that writes into what it
                # was given changes no stored version, whether it was spilled or not.
                return buffer.clone() if copy else buffer
            assert slot.path is not None
            # A fresh buffer: nothing a reader does reaches the file.
            return _read_spill(slot.path, slot.nbytes)

    def release(self, slot: Slot) -> None:
        """Forget a record no store holds any more (its finalizer)."""
        with self._lock:
            if slot.buffer is not None:
                self._resident.pop(slot.serial, None)
                self.memory_bytes -= slot.nbytes
                slot.buffer = None
            elif slot.path is not None:
                self.spilled_bytes -= slot.nbytes
                self.spilled_files -= 1
                if os.getpid() == self._pid:
                    # A finalizer: a directory removed or replaced under the run is no error.
                    with contextlib.suppress(OSError):
                        os.unlink(slot.path)
                slot.path = None

    def _enforce(self) -> None:
        budget = self.budget
        while budget is not None and self.memory_bytes > budget and self._resident:
            serial, ref = self._resident.popitem(last=False)
            record = ref()
            if record is None:
                continue
            try:
                self._spill(record.slot)
            except BaseException:
                # Still in memory: keep it first in line, so the budget stays accounted for.
                self._resident[serial] = ref
                self._resident.move_to_end(serial, last=False)
                raise

    def _spill(self, slot: Slot) -> None:
        buffer = slot.buffer
        assert buffer is not None
        if slot.nbytes == 0:
            return  # a tree of empty tensors costs no memory and has nothing to map
        path = os.path.join(self._directory(), f"{slot.serial}.bin")
        _write_spill(path, buffer)  # in full before the slot points at it
        slot.path = path
        slot.buffer = None
        self.memory_bytes -= slot.nbytes
        self.spilled_bytes += slot.nbytes
        self.spilled_files += 1

    def _directory(self) -> str:
        if self._dir is None:
            # Locked by this process: a later store removes it if this process was killed.
            self._dir = owned_dir(STORE_PREFIX, self.spill_dir)
            weakref.finalize(self, _remove_dir, self._dir, self._pid)
        return self._dir.path
