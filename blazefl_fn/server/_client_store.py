"""Per-client state held by the server, kept only for clients that took part.

A `ClientStore` is an immutable value: `ClientStore.updated` returns a new store and leaves the
old one readable, so a round stays a pure function ``(state, key) -> state`` while the store
costs O(clients that took part), not O(clients). Reading or updating costs O(clients touched):
the store is a persistent 64-way trie over client ids whose versions share every node they do
not change.

Each stored tree is packed into one buffer. The buffers of one store and all the versions made
from it count against one memory budget (`StoreOptions.memory_bytes`); beyond it the oldest
buffers move to files in a spill directory, read back into memory when their client is
sampled again. Spilling changes where bytes lie, never their values: a spilled store reads back
bit for bit what was put in. A buffer (in memory or on disk) is released as soon as no live
store version holds it, and the spill directory is removed when the last store using it is
gone, or when the interpreter exits; one left by a process that was killed is removed by the
next store with a memory budget made on the machine.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, SupportsIndex, cast, final

import attrs
import torch

from .._validators import int_at_least
from ..tree import Params, TreeSpec, digest
from ._store_backing import Backing, Record

__all__ = ["ClientStore", "StateLayout", "StoreOptions"]

_BITS = 6
_FAN = 1 << _BITS
_MASK = _FAN - 1


def _memory_bytes(
    _instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None:
        int_at_least(0)(_instance, attribute, value)


def _path(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"spill_dir must be a path or None, got {type(value).__name__}")
    return os.fspath(cast("str | os.PathLike[str]", value))


def _spill_dir(_instance: object, _attribute: object, value: str | None) -> None:
    # Checked now, not at the first spill, which may come hours into a run.
    if value is not None and not os.path.isdir(value):
        raise ValueError(f"spill_dir {value!r} is not a directory")


@attrs.frozen
class StoreOptions:
    """Where a `ClientStore` keeps its clients' trees.

    Attributes:
        memory_bytes: bytes of stored trees kept in memory (default 1 GiB); the oldest beyond
            it are spilled to files. None keeps everything in memory; 0 spills every tree.
        spill_dir: an existing directory under which a private spill directory is made on
            the first spill (default: the system's temporary directory, which may be a RAM
            disk).

    Raises:
        ValueError: a negative ``memory_bytes``, or a ``spill_dir`` that is not a directory.
        TypeError: a ``spill_dir`` that is not a path.
    """

    memory_bytes: int | None = attrs.field(default=1 << 30, validator=_memory_bytes)
    spill_dir: str | None = attrs.field(default=None, converter=_path, validator=_spill_dir)


_Node = tuple[Any, ...]


def _levels(num_clients: int) -> int:
    return max(1, -(-max(1, (num_clients - 1).bit_length()) // _BITS))


def _get(node: _Node | None, client_id: int, shift: int) -> Record | None:
    while node is not None:
        child = node[(client_id >> shift) & _MASK]
        if shift == 0:
            return child
        node, shift = child, shift - _BITS
    return None


def _set(node: _Node | None, client_id: int, shift: int, value: Record | None) -> _Node | None:
    children: list[Any] = list(node) if node is not None else [None] * _FAN
    index = (client_id >> shift) & _MASK
    children[index] = (
        value if shift == 0 else _set(children[index], client_id, shift - _BITS, value)
    )
    # An emptied node is dropped, so that a store's size tracks what it holds.
    return None if all(child is None for child in children) else tuple(children)


def _walk(node: _Node | None, prefix: int, shift: int) -> Iterator[tuple[int, Record]]:
    if node is None:
        return
    for index, child in enumerate(node):
        if child is None:
            continue
        client_id = (prefix << _BITS) | index
        if shift == 0:
            yield client_id, child
        else:
            yield from _walk(child, client_id, shift - _BITS)


Shape = tuple[int | None, ...]
"""A stored entry's shape; a None dimension may take any size up to `StateLayout.max_free`."""


def _entries(value: object) -> tuple[tuple[str, torch.dtype, Shape], ...]:
    items = cast(Any, value)
    return tuple(sorted((str(n), d, tuple(s)) for n, d, s in items))


@attrs.frozen
class StateLayout:
    """What every client's stored tree holds: each entry's name, dtype and shape.

    A store with a layout refuses, with a `ValueError` naming the client and the entry, any
    tree with other names, another dtype or another shape, whether a round stores it or a
    checkpoint restores it. So a checkpoint whose client state is laid out otherwise (from
    another model, or forged, its checksum recomputed) is refused at load rather than failing
    rounds later or broadcasting into a huge allocation. The layout is the structure, not the
    values: a forged file can still hold wrong values of the right shape.

    Attributes:
        entries: ``(name, dtype, shape)`` of every entry, sorted by name.
        max_free: the largest size a None dimension may take.

    Examples:
        >>> import torch
        >>> layout = StateLayout.of({"w": torch.zeros(2, 3)})
        >>> store = ClientStore(4, layout=layout).updated({1: {"w": torch.ones(2, 3)}})
        >>> try:
        ...     store.updated({2: {"w": torch.ones(3)}})
        ... except ValueError as error:
        ...     print(str(error).split("; ")[0])
        client 2's stored state has 'w' float32 [3]
    """

    entries: tuple[tuple[str, torch.dtype, Shape], ...] = attrs.field(converter=_entries)
    max_free: int = attrs.field(default=2**31 - 1, validator=int_at_least(0))

    @classmethod
    def of(cls, tree: Params, prefix: str = "") -> StateLayout:
        """The layout of trees shaped like ``tree``, its names prefixed with ``prefix``."""
        return cls(tuple((prefix + n, t.dtype, tuple(t.shape)) for n, t in tree.items()))

    def plus(self, other: StateLayout) -> StateLayout:
        """Both layouts' entries in one (the smaller ``max_free``).

        Raises:
            ValueError: the two name an entry alike.
        """
        names = {n for n, _, _ in self.entries} & {n for n, _, _ in other.entries}
        if names:
            raise ValueError(f"both layouts hold {sorted(names)}")
        return StateLayout(self.entries + other.entries, min(self.max_free, other.max_free))

    def check(
        self,
        client_id: int,
        names: Sequence[str],
        dtypes: Sequence[torch.dtype],
        shapes: Sequence[Sequence[int]],
    ) -> None:
        """Refuse a tree of these entries unless it is laid out as this layout says.

        Raises:
            ValueError: other names, or an entry of another dtype or shape.
        """
        expected = {n: (d, s) for n, d, s in self.entries}
        if sorted(names) != sorted(expected):
            raise ValueError(
                f"client {client_id}'s stored state holds {sorted(names)}; this algorithm "
                f"keeps {sorted(expected)}"
            )
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            want_dtype, want_shape = expected[name]
            fits = len(shape) == len(want_shape) and all(
                (w is None and 0 <= d <= self.max_free) or d == w
                for d, w in zip(shape, want_shape, strict=True)
            )
            if dtype != want_dtype or not fits:
                raise ValueError(
                    f"client {client_id}'s stored state has {name!r} {_short(dtype)} "
                    f"{list(shape)}; this algorithm keeps {name!r} {_short(want_dtype)} "
                    f"{['*' if w is None else w for w in want_shape]}"
                )


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@final
class ClientStore:
    """Each client's stored tree, by id, for clients ``0..num_clients-1``; an immutable value.

    A client that never stored anything reads as an empty tree (``{}``). Storing an empty tree
    forgets the client.

    Args:
        num_clients: the clients of the federation (>= 1).
        options: the memory budget and spill directory (`StoreOptions`).
        layout: what every stored tree holds (`StateLayout`); None accepts any tree.

    Raises:
        ValueError: ``num_clients < 1``.

    Examples:
        >>> import torch
        >>> empty = ClientStore(1_000_000)
        >>> store = empty.updated({7: {"c": torch.ones(2)}})
        >>> store[7]["c"], dict(store[8]), empty.num_stored, store.num_stored
        (tensor([1., 1.]), {}, 0, 1)
    """

    __slots__ = ("_backing", "_count", "_layout", "_num_clients", "_options", "_root", "_shift")

    def __init__(
        self,
        num_clients: int,
        options: StoreOptions | None = None,
        *,
        layout: StateLayout | None = None,
    ) -> None:
        if isinstance(num_clients, bool) or not isinstance(num_clients, int):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"num_clients must be an int, got {type(num_clients).__name__}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if options is not None and not isinstance(options, StoreOptions):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"options must be StoreOptions, got {type(options).__name__}")
        self._num_clients = num_clients
        self._shift = (_levels(num_clients) - 1) * _BITS
        self._root: _Node | None = None
        self._count = 0
        if layout is not None and not isinstance(layout, StateLayout):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"layout must be a StateLayout, got {type(layout).__name__}")
        self._options = options if options is not None else StoreOptions()
        self._layout = layout
        self._backing = Backing(self._options.memory_bytes, self._options.spill_dir)

    @property
    def num_clients(self) -> int:
        """The clients the store can hold (the federation's size)."""
        return self._num_clients

    @property
    def num_stored(self) -> int:
        """How many clients hold a tree in this version."""
        return self._count

    @property
    def options(self) -> StoreOptions:
        """The memory budget and spill directory."""
        return self._options

    @property
    def layout(self) -> StateLayout | None:
        """What every stored tree holds (None: anything)."""
        return self._layout

    @property
    def memory_bytes(self) -> int:
        """Bytes of trees in memory, over this store and every version sharing its budget."""
        return self._backing.memory_bytes

    @property
    def spilled_bytes(self) -> int:
        """Bytes of trees in spill files, over this store and every version sharing them."""
        return self._backing.spilled_bytes

    def __getitem__(self, client_id: int) -> dict[str, torch.Tensor]:
        """Client ``client_id``'s tree (a new dict; ``{}`` if it stored none).

        Raises:
            IndexError: ``client_id`` is outside ``[0, num_clients)``.
        """
        record = _get(self._root, self._check(client_id), self._shift)
        return {} if record is None else self._backing.load(record)

    def __contains__(self, client_id: object) -> bool:
        if isinstance(client_id, bool) or not hasattr(client_id, "__index__"):
            return False
        index = operator.index(cast(SupportsIndex, client_id))
        if not 0 <= index < self._num_clients:
            return False
        return _get(self._root, index, self._shift) is not None

    def __iter__(self) -> Iterator[Any]:
        """Refused: walking every client would cost O(num_clients); use `items` or `ids`."""
        raise TypeError(
            "a ClientStore is not iterated over all its clients; use store.items() (the "
            "clients holding state) or store[client_id]"
        )

    def ids(self) -> tuple[int, ...]:
        """The clients holding a tree, ascending (costs O(stored clients))."""
        return tuple(cid for cid, _ in _walk(self._root, 0, self._shift))

    def items(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(client id, tree)`` for every client holding one, ascending."""
        for client_id, record in _walk(self._root, 0, self._shift):
            yield client_id, self._backing.load(record)

    def digest(self) -> str:
        """SHA-256 (hex) of what the store holds: each stored client's id and tree digest.

        Equal for equal contents, however they were stored (in any order, over any number of
        versions, in memory or spilled); the federation's size and the budget do not count.
        Costs one read of every stored tree.

        Examples:
            >>> import torch
            >>> a = ClientStore(9).updated({1: {"c": torch.ones(2)}, 4: {"c": torch.zeros(2)}})
            >>> b = ClientStore(9, StoreOptions(memory_bytes=0)).updated(
            ...     {4: {"c": torch.zeros(2)}}).updated({1: {"c": torch.ones(2)}})
            >>> a.digest() == b.digest() != ClientStore(9).digest()
            True
        """
        h = hashlib.sha256(b"blazefl_fn.ClientStore\0")
        for client_id, tree in self.items():
            h.update(f"{client_id}\0{digest(tree)}\0".encode())
        return h.hexdigest()

    def packed_items(self) -> Iterator[tuple[int, torch.Tensor, TreeSpec]]:
        """``(client id, packed bytes, layout)`` for every client holding a tree, ascending:
        what a checkpoint stores (`blazefl_fn.tree.unflatten` reads a tree back). The bytes
        of a tree in memory are the store's own, not a copy: read them, never write."""
        for client_id, record in _walk(self._root, 0, self._shift):
            yield client_id, self._backing.buffer(record, copy=False), record.spec

    def with_packed(self, entries: Mapping[int, tuple[torch.Tensor, TreeSpec]]) -> ClientStore:
        """A new store with the packed trees ``entries`` (as `packed_items` gives them, on the
        CPU) stored for their clients, taken without unpacking.

        Raises:
            IndexError: a client id is outside ``[0, num_clients)``.
            ValueError: a buffer is not a 1-D uint8 CPU tensor of its layout's size, a
                layout is empty, or it is not the store's `StateLayout`.
        """
        checked: dict[int, tuple[torch.Tensor, TreeSpec]] = {}
        for client_id, (buffer, spec) in entries.items():
            ok = buffer.dtype == torch.uint8 and buffer.dim() == 1 and buffer.device.type == "cpu"
            if not ok or buffer.numel() != spec.nbytes or not spec.names:
                raise ValueError(
                    f"client {client_id}: a packed tree must be a 1-D uint8 CPU tensor of "
                    f"{spec.nbytes} bytes with at least one entry"
                )
            if self._layout is not None:
                self._layout.check(client_id, spec.names, spec.dtypes, spec.shapes)
            checked[self._check(client_id)] = (buffer, spec)
        cpu = torch.device("cpu")
        return self._with_records(
            {
                client_id: self._backing.adopt(buffer, spec, (cpu,) * len(spec.names))
                for client_id, (buffer, spec) in sorted(checked.items())
            }
        )

    def updated(self, trees: Mapping[int, Params]) -> ClientStore:
        """A new store with ``trees`` stored for their clients (this one is unchanged).

        Raises:
            IndexError: a client id is outside ``[0, num_clients)``.
            ValueError: a non-empty tree is not laid out as the store's `StateLayout` says.
        """
        # Everything is checked before anything is stored (or spilled).
        checked = {
            self._check(client_id): _tree(client_id, tree) for client_id, tree in trees.items()
        }
        if self._layout is not None:
            for client_id, tree in checked.items():
                if tree:
                    names = list(tree)
                    self._layout.check(
                        client_id,
                        names,
                        [tree[n].dtype for n in names],
                        [tuple(tree[n].shape) for n in names],
                    )
        return self._with_records(
            {
                client_id: self._backing.record(tree) if tree else None
                for client_id, tree in sorted(checked.items())
            }
        )

    def cleared(self) -> ClientStore:
        """An empty store of the same size that shares this one's memory budget and spill
        directory (one budget for an algorithm's several stores).

        Examples:
            >>> import torch
            >>> a = ClientStore(10, StoreOptions(memory_bytes=1 << 20))
            >>> b = a.cleared().updated({1: {"x": torch.zeros(16)}})
            >>> a.memory_bytes == b.memory_bytes == 64
            True
        """
        return self._derived(None, 0)

    def laid_out(self, layout: StateLayout | None) -> ClientStore:
        """This store, its trees checked against ``layout``, holding to it from now on.

        Raises:
            ValueError: a stored tree is not laid out so.
        """
        if layout is not None:
            for client_id, record in _walk(self._root, 0, self._shift):
                spec = record.spec
                layout.check(client_id, spec.names, spec.dtypes, spec.shapes)
        out = self._derived(self._root, self._count)
        out._layout = layout
        return out

    def _with_records(self, records: Mapping[int, Record | None]) -> ClientStore:
        """A new version with ``records`` (checked ids; None forgets the client) set."""
        root, count = self._root, self._count
        for client_id, record in records.items():
            had = _get(root, client_id, self._shift) is not None
            root = _set(root, client_id, self._shift, record)
            count += (record is not None) - had
        return self._derived(root, count)

    def _derived(self, root: _Node | None, count: int) -> ClientStore:
        out = object.__new__(ClientStore)
        out._num_clients = self._num_clients
        out._shift = self._shift
        out._root = root
        out._count = count
        out._options = self._options
        out._layout = self._layout
        out._backing = self._backing
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._num_clients, self.options, tuple(self.items()), self._layout))

    def __repr__(self) -> str:
        return (
            f"ClientStore(num_clients={self._num_clients}, stored={self._count}, "
            f"memory_bytes={self.memory_bytes}, spilled_bytes={self.spilled_bytes})"
        )

    def _check(self, client_id: int) -> int:
        if isinstance(client_id, bool) or not hasattr(client_id, "__index__"):
            raise TypeError(f"client ids are ints, got {type(client_id).__name__}: {client_id!r}")
        index = operator.index(client_id)
        if not 0 <= index < self._num_clients:
            raise IndexError(f"client {index} is outside [0, {self._num_clients})")
        return index


def _tree(client_id: object, tree: object) -> Params:
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"client {client_id}'s state must be a mapping of names to tensors, got "
            f"{type(tree).__name__}"
        )
    items = cast(Mapping[object, object], tree)
    for name, value in items.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(
                f"client {client_id}'s state must map str names to tensors, got "
                f"{name!r}: {type(value).__name__}"
            )
    return cast(Params, tree)


def _rebuild(
    num_clients: int,
    options: StoreOptions,
    items: tuple[tuple[int, Params], ...],
    layout: StateLayout | None = None,
) -> ClientStore:
    return ClientStore(num_clients, options, layout=layout).updated(dict(items))
