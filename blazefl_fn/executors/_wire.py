"""A client's result as a Ray actor sends it back: its tensors as raw bytes beside the rest.

Ray pickles a torch tensor with torch's own reducer, which writes each storage with
`torch.save` and reads it back with `torch.load`: for the small CNN of the W0 benchmark about
half a millisecond each way per client, in the actor and again in the driver. `Packed` pickles
the result with every plain CPU tensor replaced by a reference into a list of numpy byte
arrays, which Ray moves through its object store without pickling them (pickle protocol 5
out-of-band buffers); the driver copies each array into a fresh tensor of the same dtype and
shape. The bytes are the tensor's bytes, so the values are bit for bit the same.

A tensor that is not plain (another device, a subclass such as ``nn.Parameter``, one that
requires grad, a view of a larger storage, non-contiguous, conjugated or negated, sparse or
quantised) is pickled by torch's own reducer, as before (a ``Parameter``'s data, itself a plain
tensor, still travels as bytes).
"""

from __future__ import annotations

import io
import pickle
from typing import Any, cast

import numpy as np
import torch

__all__ = ["Packed"]


class Packed:
    """``value`` pickled with its plain tensors as out-of-band byte arrays; unpickles as ``value``.

    Examples:
        >>> t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
        >>> back = pickle.loads(pickle.dumps(Packed({"w": t, "n": 3}), protocol=5))
        >>> back["n"], back["w"].dtype, torch.equal(back["w"], t)
        (3, torch.bfloat16, True)
    """

    __slots__ = ("_arrays", "_payload")

    def __init__(self, value: object) -> None:
        arrays: list[np.ndarray[Any, Any]] = []
        out = io.BytesIO()
        _Pickler(out, arrays).dump(value)
        self._payload = out.getvalue()
        self._arrays = arrays

    def __reduce__(self) -> tuple[Any, tuple[bytes, list[np.ndarray[Any, Any]]]]:
        return _unpack, (self._payload, self._arrays)


def _plain(t: torch.Tensor) -> bool:
    """Whether ``t`` is nothing but its bytes, a dtype and a shape."""
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.requires_grad
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, arrays: list[np.ndarray[Any, Any]]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._arrays = arrays

    def persistent_id(self, obj: Any) -> tuple[int, torch.dtype, tuple[int, ...]] | None:
        if not isinstance(obj, torch.Tensor) or not _plain(obj):
            return None
        self._arrays.append(obj.reshape(-1).view(torch.uint8).numpy())
        return len(self._arrays) - 1, obj.dtype, tuple(obj.shape)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arrays: list[np.ndarray[Any, Any]]) -> None:
        super().__init__(file)
        self._arrays = arrays

    def persistent_load(self, pid: Any) -> torch.Tensor:
        index, dtype, shape = cast(tuple[int, torch.dtype, tuple[int, ...]], pid)
        raw = self._arrays[index]
        # A copy: the array may view Ray's object store, read-only and released after `get`.
        data = torch.empty(raw.nbytes, dtype=torch.uint8)
        data.numpy()[:] = raw
        return data.view(dtype).reshape(shape)


def _unpack(payload: bytes, arrays: list[np.ndarray[Any, Any]]) -> object:
    return _Unpickler(io.BytesIO(payload), arrays).load()
