"""A checkpoint's ``aux`` state as leaves: flattened to tensors and plain values with a text
description of its structure, and rebuilt against the algorithm's own ``aux`` as a template (so
the template, not the file, decides what may be built)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import attrs
import torch

__all__ = ["SCALARS", "BadLeaf", "Mismatch", "Reader", "client_tree", "fit", "flatten"]

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
            raise BadLeaf(index)
        return value
    if isinstance(template, SCALARS):
        reader.expect("S")
        return reader.leaf()
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
