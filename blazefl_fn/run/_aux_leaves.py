"""A checkpoint's ``aux`` state as leaves: flattened to tensors and plain values with a text
description of its structure, and rebuilt against the algorithm's own ``aux`` as a template (so
the template, not the file, decides what may be built)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import cast

import attrs
import torch

from ..server.client_state import ClientStore
from ..tree import TreeSpec, tree_spec

__all__ = [
    "SCALARS",
    "BadLeaf",
    "Mismatch",
    "Reader",
    "client_tree",
    "fit",
    "flatten",
]

_DECODER = json.JSONDecoder()
SCALARS = (int, float, bool, str, type(None))
"""The plain leaf types a stored aux state may hold besides tensors."""


def flatten(obj: object, where: str, leaves: list[object]) -> str:
    """Append ``obj``'s leaves to ``leaves``; return a description of its structure."""
    if isinstance(obj, torch.Tensor):
        # Copied to the CPU (not cloned where it lies): a GPU state is not doubled on the GPU.
        leaves.append(obj.detach().to("cpu", copy=True))
        return "T"
    if isinstance(obj, SCALARS):
        leaves.append(obj)
        return "S"
    if isinstance(obj, ClientStore):
        # Only the clients that hold state, in id order, one packed leaf each (spilled trees
        # are read back here), its layout in the text as JSON.
        entries: list[str] = []
        for cid, buffer, spec in obj.packed_items():
            leaves.append(buffer)
            entries.append(f"{cid}:P{_layout_json(spec)}")
        return f"Store{obj.num_clients}[" + ",".join(entries) + "]"
    if isinstance(obj, Mapping):
        mapping = cast(Mapping[object, object], obj)
        names = sorted(mapping, key=str)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"aux state at {where}: mapping keys must be str, got {names!r}")
        inner = ",".join(f"{n}:{flatten(mapping[n], f'{where}.{n}', leaves)}" for n in names)
        return "{" + inner + "}"
    if isinstance(obj, tuple | list):
        items = cast(tuple[object, ...] | list[object], obj)
        inner = ",".join(flatten(v, f"{where}[{i}]", leaves) for i, v in enumerate(items))
        return "(" + inner + ")"
    if attrs.has(type(obj)):
        fields = attrs.fields(type(obj))
        inner = ",".join(
            f"{f.name}:{flatten(getattr(obj, f.name), f'{where}.{f.name}', leaves)}" for f in fields
        )
        return f"{type(obj).__qualname__}<{inner}>"
    raise TypeError(
        f"aux state at {where}: cannot checkpoint a {type(obj).__name__}; use tensors, plain "
        f"scalars, str-keyed mappings, tuples, lists and attrs records"
    )


class Mismatch(Exception):
    """The stored aux structure does not fit the algorithm's."""


class BadLeaf(Exception):
    """A stored tensor leaf differs from the template's in shape or dtype (its index)."""


@attrs.define
class Reader:
    """A cursor over a stored `flatten` description and its leaves, walked along the
    algorithm's template (so the template, not the file, bounds the recursion)."""

    text: str
    leaves: list[object]
    pos: int = 0
    taken: int = 0

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise Mismatch
        self.pos += len(token)

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def leaf(self) -> object:
        if self.taken >= len(self.leaves):
            raise Mismatch
        self.taken += 1
        return self.leaves[self.taken - 1]


def fit(template: object, reader: Reader, *, client_state: bool = False) -> object:
    """The stored aux state: ``template``'s structure filled with the stored leaves.

    Two exceptions to "the same structure": an empty mapping inside a tuple or list (one
    tree per client kept in a tuple, empty until the client first takes part) takes the
    tensors the checkpoint stored there; and a `ClientStore`, stored as
    ``Store<N>[id:P<layout>,...]`` (only the clients holding state, each tree one packed
    uint8 leaf, its layout as JSON), is rebuilt with those trees and the template's options
    (its memory budget and spill directory).
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
            raise BadLeaf(index)
        return value
    if isinstance(template, SCALARS):
        reader.expect("S")
        return reader.leaf()
    if isinstance(template, ClientStore):
        return _store(template, reader)
    if isinstance(template, Mapping):
        mapping = cast(Mapping[str, object], template)
        reader.expect("{")
        if not mapping and client_state:
            return client_tree(reader)
        names = sorted(mapping, key=str)
        rebuilt: dict[str, object] = {}
        for k, name in enumerate(names):
            reader.expect(f"{name}:" if k == 0 else f",{name}:")
            rebuilt[name] = fit(mapping[name], reader)
        reader.expect("}")
        return {n: rebuilt[n] for n in mapping}
    if isinstance(template, tuple | list):
        items = cast(tuple[object, ...] | list[object], template)
        reader.expect("(")
        values: list[object] = []
        for k, item in enumerate(items):
            if k:
                reader.expect(",")
            values.append(fit(item, reader, client_state=True))
        reader.expect(")")
        return tuple(values) if isinstance(template, tuple) else values
    fields = attrs.fields(type(template))
    reader.expect(f"{type(template).__qualname__}<")
    values_by_name: dict[str, object] = {}
    for k, f in enumerate(fields):
        reader.expect(f"{f.name}:" if k == 0 else f",{f.name}:")
        values_by_name[f.name] = fit(getattr(template, f.name), reader)
    reader.expect(">")
    return attrs.evolve(template, **values_by_name)


def client_tree(reader: Reader) -> dict[str, torch.Tensor]:
    """The ``name:T,...}`` rest of a stored client tree (after its ``{``)."""
    out: dict[str, torch.Tensor] = {}
    while not reader.peek("}"):
        if out:
            reader.expect(",")
        end = reader.text.find(":T", reader.pos)
        if end <= reader.pos:
            raise Mismatch
        name = reader.text[reader.pos : end]
        reader.pos = end + 2
        value = reader.leaf()
        if not isinstance(value, torch.Tensor) or name in out:
            raise Mismatch
        out[name] = value
    reader.expect("}")
    return out


_MAX_DIMS = 32
_MAX_DIM = 2**48


def _layout_json(spec: TreeSpec) -> str:
    entries = [
        [name, str(dtype).removeprefix("torch."), list(shape)]
        for name, dtype, shape in zip(spec.names, spec.dtypes, spec.shapes, strict=True)
    ]
    return json.dumps(entries, separators=(",", ":"))


def _layout(reader: Reader) -> TreeSpec:
    """The layout ``[[name, dtype, shape], ...]`` at the reader's position (JSON)."""
    try:
        parsed, end = _DECODER.raw_decode(reader.text, reader.pos)
    except (json.JSONDecodeError, RecursionError):  # malformed, or nested past the stack
        raise Mismatch from None
    reader.pos = end
    if not isinstance(parsed, list) or not parsed:
        raise Mismatch  # a store holds no empty tree
    meta: dict[str, torch.Tensor] = {}
    for entry in cast(list[object], parsed):
        if not isinstance(entry, list) or len(cast(list[object], entry)) != 3:
            raise Mismatch
        name, dtype_name, shape = cast(list[object], entry)
        dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
        if not isinstance(name, str) or name in meta or not isinstance(dtype, torch.dtype):
            raise Mismatch
        dims = cast(list[object], shape) if isinstance(shape, list) else None
        if dims is None or len(dims) > _MAX_DIMS:
            raise Mismatch
        if not all(type(d) is int and 0 <= d <= _MAX_DIM for d in dims):
            raise Mismatch
        # Meta tensors: the layout is computed without allocating anything.
        try:
            meta[name] = torch.empty(cast(list[int], dims), dtype=dtype, device="meta")
        except (RuntimeError, OverflowError):  # its size overflows
            raise Mismatch from None
    return tree_spec(meta)


def _store(template: ClientStore, reader: Reader) -> ClientStore:
    """The stored ``Store<N>[id:P<layout>,...]`` as a store with ``template``'s options."""
    reader.expect(f"Store{template.num_clients}[")
    entries: dict[int, tuple[torch.Tensor, TreeSpec]] = {}
    last = -1
    while not reader.peek("]"):
        if entries:
            reader.expect(",")
        # An id is at most 20 ASCII digits, written as `flatten` writes it (no leading zero).
        end = reader.text.find(":P", reader.pos, reader.pos + 22)
        if end < 0:
            raise Mismatch
        digits = reader.text[reader.pos : end]
        if not (digits.isascii() and digits.isdigit()) or str(int(digits)) != digits:
            raise Mismatch
        client_id = int(digits)
        if not last < client_id < template.num_clients:
            raise Mismatch
        reader.pos = end + 2
        spec = _layout(reader)
        index = reader.taken
        buffer = reader.leaf()
        if (
            not isinstance(buffer, torch.Tensor)
            or buffer.dtype != torch.uint8
            or buffer.dim() != 1
            or buffer.numel() != spec.nbytes
        ):
            raise BadLeaf(index)
        entries[client_id] = (buffer, spec)
        last = client_id
    reader.expect("]")
    return template.with_packed(entries)
