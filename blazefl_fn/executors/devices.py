"""Devices belong to execution: parsing, the client-to-device map, placement, CUDA determinism.

An executor owns a tuple of devices. Client ``k`` always runs on ``devices[k % len(devices)]``
(`device_for`), whatever worker picks it up, so the bits never depend on scheduling or on the
number of workers. `to_device` moves a record tree (client updates, client data, parameters) to
a device; the executors call it once per device for the static context and once per device per
round for the broadcast.

On CUDA, client work runs under `cuda_determinism`: deterministic algorithms on, cuDNN
deterministic, cuDNN benchmarking off, and ``CUBLAS_WORKSPACE_CONFIG`` set before CUDA starts.
An op without a deterministic CUDA kernel then raises (torch's message names the op) instead of
silently changing the bits. The guarantee: on one GPU model and software stack, the same bits
across runs, executors and worker counts; GPU bits differ from CPU bits.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Generator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, Self, TypeVar, cast, runtime_checkable

import attrs
import torch

__all__ = [
    "DeviceLike",
    "Placeable",
    "available_devices",
    "check_device",
    "check_devices",
    "cuda_determinism",
    "device_for",
    "ensure_cublas_workspace",
    "parse_devices",
    "to_device",
    "uses_cuda",
]

DeviceLike = str | torch.device
"""A device as torch accepts it: ``"cpu"``, ``"cuda:1"`` or a ``torch.device``."""
T = TypeVar("T")

# Values of CUBLAS_WORKSPACE_CONFIG under which cuBLAS is deterministic (CUDA docs).
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


@runtime_checkable
class Placeable(Protocol):
    """A user type that knows how to move itself to a device (checked before attrs records)."""

    def to_device(self, device: torch.device) -> Self:
        """A copy of this object on ``device`` (or ``self`` if it is already there)."""
        ...


def available_devices() -> str:
    """What this machine offers, for error messages: ``"cpu, cuda:0, cuda:1"``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])


def check_device(device: object) -> torch.device:
    """``device`` as a `torch.device` that exists on this machine.

    ``"cuda"`` without an index means ``cuda:0``.

    Raises:
        TypeError: ``device`` is not a str or `torch.device`.
        ValueError: malformed, not a CPU or CUDA device, no CUDA, or an index past the count.

    Examples:
        >>> check_device("cpu")
        device(type='cpu')
    """
    if not isinstance(device, str | torch.device):
        raise TypeError(f"a device must be a str or torch.device, got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"malformed device {str(device)!r}; available: {available_devices()}"
        ) from None
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type != "cuda":
        raise ValueError(
            f"unsupported device {str(device)!r} (cpu and cuda only); "
            f"available: {available_devices()}"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} needs CUDA, which is not available here; "
            f"available: {available_devices()}"
        )
    # torch's stubs type ``index`` as int, but it is None for a bare "cuda".
    given = cast(int | None, parsed.index)
    index = 0 if given is None else given
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist; available: {available_devices()}")
    return torch.device("cuda", index)


def check_devices(devices: Sequence[DeviceLike]) -> tuple[torch.device, ...]:
    """Each of ``devices`` checked by `check_device`; repeats are allowed.

    Raises:
        TypeError: ``devices`` is a single str or device rather than a sequence.
        ValueError: ``devices`` is empty or one entry is bad.
    """
    if isinstance(devices, str | torch.device):
        raise TypeError(f"devices must be a sequence of devices, got {devices!r}")
    checked = tuple(check_device(d) for d in devices)
    if not checked:
        raise ValueError("devices must name at least one device")
    return checked


def parse_devices(spec: str) -> tuple[torch.device, ...]:
    """The devices a command-line value names: ``cpu``, ``cuda``, ``cuda:0,cuda:1`` or ``auto``.

    ``auto`` is every visible GPU, else the CPU.

    Raises:
        ValueError: malformed, or naming a device this machine does not have.

    Examples:
        >>> parse_devices("cpu")
        (device(type='cpu'),)
    """
    text = spec.strip()
    if text == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return tuple(torch.device("cuda", i) for i in range(torch.cuda.device_count()))
        return (torch.device("cpu"),)
    parts = [part.strip() for part in text.split(",")]
    if not text or any(not part for part in parts):
        raise ValueError(f"malformed device list {spec!r}; available: {available_devices()}")
    return check_devices(parts)


def device_for(client_id: int, devices: Sequence[torch.device]) -> torch.device:
    """The device client ``client_id`` runs on: ``devices[client_id % len(devices)]``.

    Examples:
        >>> import torch
        >>> device_for(5, (torch.device("cpu"), torch.device("cpu"))).type
        'cpu'
    """
    return devices[client_id % len(devices)]


def uses_cuda(devices: Sequence[torch.device]) -> bool:
    """Whether any of ``devices`` is a CUDA device."""
    return any(d.type == "cuda" for d in devices)


def ensure_cublas_workspace() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` to a deterministic value unless it already holds one.

    It must be in the environment before cuBLAS starts in a process; executors call this
    before they touch CUDA and before they start worker processes (which inherit it).
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _DETERMINISTIC_CUBLAS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = _DETERMINISTIC_CUBLAS[0]


@contextmanager
def cuda_determinism(enabled: bool = True) -> Generator[None]:
    """Deterministic kernels inside the block; the previous process-wide settings are restored.

    Sets ``torch.use_deterministic_algorithms(True)``, ``cudnn.deterministic = True`` and
    ``cudnn.benchmark = False``. With ``enabled=False`` it does nothing (the CPU-only path).
    On free-threaded CPython it keeps the GIL off (see `_set_deterministic_algorithms`).
    """
    if not enabled:
        yield
        return
    ensure_cublas_workspace()
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    _set_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        _set_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic = previous[2]
        torch.backends.cudnn.benchmark = previous[3]


def _set_deterministic_algorithms(mode: bool, *, warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms``, without turning the GIL on when it is off.

    The public call also sets inductor's ``deterministic`` option, importing ``torch._inductor``
    for it, and with it ``torch._dynamo`` and triton. On free-threaded CPython triton's extension
    module turns the GIL back on for the whole process (torch 2.12.0, cp313t; found by
    `make test-ft`). With the GIL off and inductor not loaded, nothing has been compiled with
    inductor, so the kernel switch alone is set. Inductor reads that switch
    (``torch.are_deterministic_algorithms_enabled()``) if it is loaded later, but not its own
    ``deterministic`` option (autotuning), which ``TORCHINDUCTOR_DETERMINISTIC=1`` sets.
    """
    gil_off = not getattr(sys, "_is_gil_enabled", lambda: True)()
    if gil_off and "torch._inductor.config" not in sys.modules:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)  # pyright: ignore[reportPrivateUsage]
    else:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def to_device(obj: T, device: torch.device, memo: MutableMapping[int, Any] | None = None) -> T:
    """``obj`` with every tensor and module inside it on ``device``; ``obj`` is not changed.

    What it walks: tensors (``tensor.to(device)``), modules (a deep copy moved to ``device``),
    `Placeable` objects (their ``to_device``), attrs records (rebuilt with placed fields),
    dicts, lists and tuples. Anything else (numbers, strings, functions) is kept as it is, so a
    closure that captures tensors is not moved: write client updates as records. What is
    already on ``device`` is returned as it is, without a copy.

    Args:
        obj: the tree to place.
        device: where to.
        memo: ``id -> placed object``; an object met twice (a dataset shared by every client)
            is moved once. Keep one memo per device for as long as the placed objects live.

    Examples:
        >>> import torch
        >>> tree = {"w": torch.ones(2), "n": 3}
        >>> to_device(tree, torch.device("cpu"))["w"] is tree["w"]
        True
    """
    return cast(T, _place(obj, device, {} if memo is None else memo))


def _place(obj: object, device: torch.device, memo: MutableMapping[int, Any]) -> object:
    if obj is None or isinstance(obj, bool | int | float | str | bytes | torch.device):
        return obj
    known = memo.get(id(obj))
    if known is not None:
        return known[1]
    placed = _place_new(obj, device, memo)
    # Keep the original alive too, so that its id cannot be reused by another object.
    memo[id(obj)] = (obj, placed)
    return placed


def _same_device(tensor: torch.Tensor, device: torch.device) -> bool:
    if tensor.device.type != device.type:
        return False
    # A CPU tensor has no index; a CUDA device given without one means the current device.
    wanted = cast(int | None, device.index)
    return device.type == "cpu" or wanted is None or tensor.device.index == wanted


def _place_new(obj: object, device: torch.device, memo: MutableMapping[int, Any]) -> object:
    if isinstance(obj, torch.Tensor):
        return obj if _same_device(obj, device) else obj.to(device)
    if isinstance(obj, torch.nn.Module):
        tensors = [*obj.parameters(), *obj.buffers()]
        if all(_same_device(t, device) for t in tensors):
            return obj
        return copy.deepcopy(obj).to(device)
    if isinstance(obj, Placeable):
        return obj.to_device(device)
    if attrs.has(type(obj)):
        return _place_record(obj, device, memo)
    if isinstance(obj, Mapping):
        items = cast(Mapping[object, object], obj)
        placed: dict[object, object] = {k: _place(v, device, memo) for k, v in items.items()}
        changed = any(placed[k] is not v for k, v in items.items())
        return placed if changed or not isinstance(obj, dict) else cast(object, obj)
    if type(obj) in (list, tuple):
        values = cast(Sequence[object], obj)
        placed_values = [_place(v, device, memo) for v in values]
        if all(p is v for p, v in zip(placed_values, values, strict=True)):
            return obj
        return tuple(placed_values) if isinstance(obj, tuple) else placed_values
    return obj


def _place_record(obj: object, device: torch.device, memo: MutableMapping[int, Any]) -> object:
    changes: dict[str, object] = {}
    for field in attrs.fields(type(obj)):
        if not field.init:
            continue
        value = getattr(obj, field.name)
        placed = _place(value, device, memo)
        if placed is not value:
            changes[field.alias or field.name] = placed
    return attrs.evolve(obj, **changes) if changes else obj
