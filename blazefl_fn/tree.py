"""Parameter trees: a small, pure algebra on name -> tensor mappings.

A `Params` is any ``Mapping[str, Tensor]`` (a model's ``state_dict`` is one). Every function
here returns new tensors and never writes into the tensors it was given. Binary operations
require the same names; results keep the name order of the first argument.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
import torch

from ._validators import check_weights

__all__ = [
    "Params",
    "TreeSpec",
    "add",
    "add_weighted",
    "all_finite",
    "clone",
    "digest",
    "flatten",
    "floating_names",
    "from_module",
    "map_params",
    "nbytes",
    "nonfinite",
    "pack",
    "scale",
    "select",
    "split_packed",
    "sub",
    "tree_spec",
    "trees_equal",
    "unflatten",
    "unpack",
    "weighted_mean",
    "weighted_sum",
]

Params = Mapping[str, torch.Tensor]
"""A parameter tree: tensors by name, as in a ``state_dict``; functions never write into one."""

# Offsets in a flat buffer are multiples of this, so every entry can be viewed as its own dtype.
_ALIGN = 64


def _check_same_names(a: Params, b: Params) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"parameter trees differ in names: {missing}")


def map_params(
    fn: Callable[[torch.Tensor], torch.Tensor], params: Params
) -> dict[str, torch.Tensor]:
    """Apply ``fn`` to every tensor.

    Examples:
        >>> import torch
        >>> map_params(lambda t: t * 2, {"w": torch.ones(2)})
        {'w': tensor([2., 2.])}
    """
    return {name: fn(tensor) for name, tensor in params.items()}


def clone(params: Params) -> dict[str, torch.Tensor]:
    """Detached copies of every tensor."""
    return map_params(lambda t: t.detach().clone(), params)


def from_module(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a module's state (parameters and persistent buffers)."""
    return clone(module.state_dict())


def add(a: Params, b: Params) -> dict[str, torch.Tensor]:
    """``a + b`` name by name."""
    _check_same_names(a, b)
    return {name: a[name] + b[name] for name in a}


def add_weighted(
    base: Params, trees: Sequence[Params], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``base + sum_i weights[i] * trees[i]`` (weights of any sign), over ``base``'s names.

    Accumulated in float64 in list order and rounded once to ``base``'s dtypes, so a server
    step of many small client terms loses nothing to intermediate rounding.

    Raises:
        ValueError: ``trees`` and ``weights`` differ in length, a weight is not finite, or a
            tree lacks one of ``base``'s names.

    Examples:
        >>> import torch
        >>> add_weighted({"w": torch.tensor([1.0])}, [{"w": torch.tensor([2.0])}], [-0.5])
        {'w': tensor([0.])}
    """
    checked = check_weights(weights, len(trees), signed=True)
    for t in trees:
        missing = sorted(set(base) - set(t))
        if missing:
            raise ValueError(f"a tree lacks the names {missing}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        acc = tensor.detach().to(torch.float64, copy=True)
        for t, w in zip(trees, checked, strict=True):
            acc.add_(t[name].detach().to(torch.float64), alpha=w)
        out[name] = acc.to(tensor.dtype)
    return out


def sub(a: Params, b: Params) -> dict[str, torch.Tensor]:
    """``a - b`` name by name."""
    _check_same_names(a, b)
    return {name: a[name] - b[name] for name in a}


def scale(params: Params, factor: float) -> dict[str, torch.Tensor]:
    """``factor * params``."""
    return map_params(lambda t: t * factor, params)


def _check_weights(trees: Sequence[Params], weights: Sequence[float]) -> list[float]:
    if len(trees) == 0:
        raise ValueError("need at least one parameter tree")
    checked = check_weights(weights, len(trees))
    for tree in trees[1:]:
        _check_same_names(trees[0], tree)
    return checked


def weighted_sum(trees: Sequence[Params], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i weights[i] * trees[i]``, accumulated in float64 in the given order.

    The fixed order and precision make the result independent of anything but the inputs.
    Results are float64; `weighted_mean` casts back to the input dtypes.
    """
    checked = _check_weights(trees, weights)
    first = trees[0]
    out = {
        name: torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for name, t in first.items()
    }
    if _foreach_exact(trees, first):
        # Two calls per tree instead of two per entry (20 000 for 1000 clients of 10 entries):
        # on the CPU a foreach op is the same per-tensor kernel run from C++, so the bits are
        # those of the loop below. Scratch holds each tree's entries converted to float64.
        # Under no_grad the entries need no detaching (one per tensor of every tree).
        accs = list(out.values())
        scratch = [torch.empty_like(acc) for acc in accs]
        names = list(out)
        with torch.no_grad():
            for tree, w in zip(trees, checked, strict=True):
                torch._foreach_copy_(scratch, [tree[name] for name in names])  # pyright: ignore[reportPrivateImportUsage, reportPrivateUsage]
                torch._foreach_add_(accs, scratch, alpha=w)  # pyright: ignore[reportPrivateImportUsage, reportPrivateUsage]
        return out
    for name, acc in out.items():
        for tree, w in zip(trees, checked, strict=True):
            acc.add_(tree[name].detach().to(torch.float64), alpha=w)
    return out


def _foreach_exact(trees: Sequence[Params], first: Params) -> bool:
    """Whether foreach ops over ``trees`` are the per-tensor kernels of the plain loop: real
    (not complex) entries on the CPU (a device's fused foreach kernels may round differently),
    each of its shape in ``first`` (the loop would broadcast or fail on its own terms)."""
    if not all(t.device.type == "cpu" and not t.is_complex() for t in first.values()):
        return False
    shapes = [t.shape for t in first.values()]
    return all(
        t.device.type == "cpu" and t.shape == shape
        for tree in trees
        for t, shape in zip(tree.values(), shapes, strict=True)
    ) and all(list(tree) == list(first) for tree in trees)


def weighted_mean(trees: Sequence[Params], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted average of ``trees``, in the dtypes of ``trees[0]``.

    Accumulated in float64 in list order, so float32 (and narrower) results are the correctly
    rounded mean to within float64 error, and lie between the inputs' minimum and maximum;
    float64 inputs are accurate to a few ulps. Integer entries (e.g. BatchNorm's
    ``num_batches_tracked``) are rounded to nearest.

    Raises:
        ValueError: no trees, mismatched names or lengths, a negative or non-finite weight, or
            all weights zero.

    Examples:
        >>> import torch
        >>> weighted_mean([{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}], [3, 1])
        {'w': tensor([1.])}
    """
    checked = _check_weights(trees, weights)
    total = sum(checked)
    if total <= 0.0:
        raise ValueError(f"weights sum to {total}; at least one must be positive")
    summed = weighted_sum(trees, [w / total for w in checked])
    out: dict[str, torch.Tensor] = {}
    for name, acc in summed.items():
        dtype = trees[0][name].dtype
        out[name] = acc.to(dtype) if dtype.is_floating_point else acc.round().to(dtype)
    return out


def select(params: Params, names: Sequence[str] | frozenset[str]) -> dict[str, torch.Tensor]:
    """The entries of ``params`` named in ``names`` (in ``params``' order), not copied.

    Raises:
        ValueError: a name is not in ``params``.

    Examples:
        >>> import torch
        >>> select({"w": torch.ones(1), "running_mean": torch.zeros(1)}, ["w"])
        {'w': tensor([1.])}
    """
    missing = sorted(set(names) - set(params))
    if missing:
        raise ValueError(f"names not in the tree: {missing}")
    wanted = set(names)
    return {name: t for name, t in params.items() if name in wanted}


# Separates a part's name from an entry's name in `pack`; never part of a module's names.
_SEP = "/"


def pack(parts: Mapping[str, Params]) -> dict[str, torch.Tensor]:
    """Several named trees as one (``{"c": {"w": t}}`` -> ``{"c/w": t}``), e.g. one message.

    The tensors are not copied; `unpack` and `split_packed` invert it.

    Raises:
        ValueError: a part's name is empty or contains ``"/"``.

    Examples:
        >>> import torch
        >>> msg = pack({"params": {"w": torch.ones(1)}, "c": {"w": torch.zeros(1)}})
        >>> sorted(msg), unpack(msg, "c")
        (['c/w', 'params/w'], {'w': tensor([0.])})
    """
    out: dict[str, torch.Tensor] = {}
    for part, tree in parts.items():
        if not part or _SEP in part:
            raise ValueError(f"a packed part's name must be non-empty without '/', got {part!r}")
        for name, tensor in tree.items():
            out[f"{part}{_SEP}{name}"] = tensor
    return out


def unpack(packed: Params, part: str) -> dict[str, torch.Tensor]:
    """The tree `pack` stored under ``part`` (empty if there is none).

    Raises:
        ValueError: ``part`` contains ``"/"``.
    """
    if _SEP in part:
        raise ValueError(f"a packed part's name has no '/', got {part!r}")
    prefix = part + _SEP
    return {name[len(prefix) :]: t for name, t in packed.items() if name.startswith(prefix)}


def split_packed(packed: Params) -> dict[str, dict[str, torch.Tensor]]:
    """Every part of a `pack`ed tree, by part name.

    Raises:
        ValueError: an entry has no ``"part/"`` prefix (the tree was not packed).
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in packed.items():
        part, sep, rest = name.partition(_SEP)
        if not sep or not part:
            raise ValueError(f"entry {name!r} is not packed (no 'part/' prefix)")
        parts.setdefault(part, {})[rest] = tensor
    return parts


def trees_equal(a: Params, b: Params) -> bool:
    """Whether ``a`` and ``b`` have the same names, dtypes, shapes and bits."""
    return digest(a) == digest(b)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def digest(params: Params) -> str:
    """SHA-256 (hex) over every entry's name, dtype, shape and raw bytes, in sorted name order.

    Two trees have the same digest exactly when they are bitwise equal; name order does not
    matter. This is the ``params_sha256`` that runs report.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        tensor = params[name]
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0"
        h.update(len(header).to_bytes(8, "little"))
        h.update(header.encode("utf-8"))
        data = _tensor_bytes(tensor)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def floating_names(params: Params) -> list[str]:
    """The names of the floating-point entries, in the tree's order.

    Examples:
        >>> import torch
        >>> floating_names({"w": torch.zeros(2), "n": torch.tensor(3), "b": torch.zeros(1)})
        ['w', 'b']
    """
    return [name for name, t in params.items() if t.dtype.is_floating_point]


def nonfinite(params: Params) -> list[str]:
    """The names of the floating-point (or complex) entries holding a NaN or an infinity, sorted.

    Examples:
        >>> import torch
        >>> nonfinite({"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2),
        ...            "n": torch.tensor([7])})
        ['w']
    """
    return sorted(
        name
        for name, t in params.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    )


def all_finite(trees: Iterable[Params]) -> bool:
    """Whether no floating-point (or complex) entry of any of ``trees`` holds a NaN or an infinity.

    `nonfinite` for many trees at once, answered in one pass: a fused norm per device and
    dtype (a NaN or an infinity makes its tensor's norm non-finite), then, only if some norm is
    not finite (which finite values can also cause, by overflow), the exact check.

    Examples:
        >>> import torch
        >>> all_finite([{"w": torch.ones(2)}, {"w": torch.tensor([1.0, float("inf")])}])
        False
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tree in trees:
        for t in tree.values():
            if t.is_floating_point() or t.is_complex():
                groups.setdefault((t.device, t.dtype), []).append(t)
    # No graph is recorded, so the tensors need no detaching (10,000 detaches, one per uplink
    # tensor of a 1000-client W0 round, cost ~6 ms).
    with torch.no_grad():
        for tensors in groups.values():
            # One kernel over every tensor: per tensor, isfinite().all() cost ~25 us, which for
            # the uplinks of 1000 small clients was a quarter of a second of the round.
            norms = torch._foreach_norm(tensors, 2)  # pyright: ignore[reportPrivateImportUsage, reportPrivateUsage]
            if not bool(torch.isfinite(torch.stack(norms)).all()):
                return all(bool(torch.isfinite(t).all()) for t in tensors)
    return True


def nbytes(params: Params) -> int:
    """Total size of the tensors' elements in bytes (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in params.values())


@attrs.frozen
class TreeSpec:
    """Where each entry of a flattened tree lives in its byte buffer."""

    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: int


def tree_spec(params: Params) -> TreeSpec:
    """The flat layout of ``params``: entries in order, each at a 64-byte-aligned offset."""
    names = tuple(params)
    offsets: list[int] = []
    position = 0
    for name in names:
        offsets.append(position)
        size = params[name].numel() * params[name].element_size()
        position += -(-size // _ALIGN) * _ALIGN
    return TreeSpec(
        names=names,
        dtypes=tuple(params[n].dtype for n in names),
        shapes=tuple(tuple(params[n].shape) for n in names),
        offsets=tuple(offsets),
        nbytes=position,
    )


def flatten(params: Params, out: torch.Tensor | None = None) -> tuple[torch.Tensor, TreeSpec]:
    """Pack a tree into one contiguous uint8 buffer (entries aligned to 64 bytes).

    Mixed dtypes are fine. `unflatten` inverts it without copying.

    Args:
        params: the tree.
        out: a 1-D uint8 tensor to write into (e.g. a shared-memory buffer); its first
            ``spec.nbytes`` bytes are used and returned. A new buffer is allocated if None.

    Raises:
        ValueError: ``out`` is not a 1-D uint8 tensor of at least ``spec.nbytes`` bytes.

    Examples:
        >>> import torch
        >>> buf, spec = flatten({"a": torch.ones(2), "b": torch.arange(3)})
        >>> unflatten(buf, spec)["b"]
        tensor([0, 1, 2])
    """
    spec = tree_spec(params)
    if out is None:
        buffer = torch.zeros(spec.nbytes, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < spec.nbytes:
        raise ValueError(
            f"out must be a 1-D uint8 tensor of at least {spec.nbytes} bytes, "
            f"got {out.dtype} of shape {tuple(out.shape)}"
        )
    else:
        buffer = out[: spec.nbytes]
    views = _views(buffer, spec)
    if views is None:  # ``out`` is not aligned to an entry's dtype: copy bytes
        for name, offset in zip(spec.names, spec.offsets, strict=True):
            data = params[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            buffer[offset : offset + data.numel()] = data
    elif spec.names:
        # One call copies every entry into its typed view of the buffer (converting device
        # and layout as ``copy_`` does); entry by entry, the views and copies cost ~2x.
        with torch.no_grad():
            torch._foreach_copy_(list(views.values()), [params[n] for n in spec.names])  # pyright: ignore[reportPrivateImportUsage, reportPrivateUsage]
    return buffer, spec


def unflatten(buffer: torch.Tensor, spec: TreeSpec) -> dict[str, torch.Tensor]:
    """Views into ``buffer`` shaped as the tree ``spec`` describes (no copy).

    Raises:
        ValueError: ``buffer`` is not a 1-D uint8 tensor of ``spec.nbytes`` bytes.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != spec.nbytes:
        raise ValueError(
            f"expected a 1-D uint8 buffer of {spec.nbytes} bytes, "
            f"got {buffer.dtype} of shape {tuple(buffer.shape)}"
        )
    views = _views(buffer, spec)
    if views is not None:
        return views
    out: dict[str, torch.Tensor] = {}  # not aligned to every dtype: each entry sliced alone
    for name, dtype, shape, offset in zip(
        spec.names, spec.dtypes, spec.shapes, spec.offsets, strict=True
    ):
        size = dtype.itemsize * math.prod(shape)
        out[name] = buffer[offset : offset + size].view(dtype).reshape(shape)
    return out


def _views(buffer: torch.Tensor, spec: TreeSpec) -> dict[str, torch.Tensor] | None:
    """``spec``'s entries as contiguous views into the uint8 ``buffer`` of ``spec.nbytes``.

    Each entry is one ``as_strided`` of the buffer viewed as its dtype (a slice, a dtype view
    and a reshape per entry cost 3x as much; a round of 1000 small clients makes 1000 trees).
    None if the buffer cannot be viewed as some entry's dtype (its start or length is not a
    multiple of that dtype's size).
    """
    out: dict[str, torch.Tensor] = {}
    typed: dict[torch.dtype, torch.Tensor] = {}
    for name, dtype, shape, offset in zip(
        spec.names, spec.dtypes, spec.shapes, spec.offsets, strict=True
    ):
        size = dtype.itemsize
        whole = typed.get(dtype)
        if whole is None:
            if buffer.storage_offset() % size or buffer.numel() % size or offset % size:
                return None
            whole = typed[dtype] = buffer.view(dtype)
        elif offset % size:
            return None
        strides: list[int] = []
        step = 1
        for dim in reversed(shape):
            strides.append(step)
            step *= dim
        strides.reverse()
        out[name] = whole.as_strided(shape, strides, whole.storage_offset() + offset // size)
    return out
