"""How a Ray actor's results travel: plain tensors as raw bytes, bit for bit; the rest as before."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from blazefl_fn.executors._wire import Packed

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool, torch.complex64]  # fmt: skip


def _through_ray_style_pickle(value: object) -> tuple[Any, list[pickle.PickleBuffer]]:
    """``value`` pickled as Ray does (protocol 5, out-of-band buffers) and read back."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers), buffers


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_plain_tensors_come_back_with_their_bits_dtype_and_shape(
    dtype: torch.dtype, shape: tuple[int, ...], seed: int
) -> None:
    size = torch.Size(shape).numel() * dtype.itemsize
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8)
    t = raw.view(dtype).reshape(shape)  # any bit pattern, NaNs too
    back, buffers = _through_ray_style_pickle(Packed({"t": t, "meta": ("x", 3)}))
    assert back["meta"] == ("x", 3)
    assert (back["t"].dtype, back["t"].shape) == (t.dtype, t.shape)
    assert _bytes(back["t"]) == _bytes(t)  # NaN payloads included
    assert len(buffers) == 1  # the bytes went out of band, not through torch.save


def test_a_result_is_its_own_writable_memory() -> None:
    t = torch.arange(4.0)
    back, _ = _through_ray_style_pickle(Packed([t]))
    back[0].add_(1.0)
    assert torch.equal(t, torch.arange(4.0))
    assert back[0].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_tensors_that_are_more_than_bytes_travel_as_before() -> None:
    base = torch.arange(12.0)
    param = torch.nn.Parameter(torch.ones(2))
    grad = torch.ones(3, requires_grad=True)
    value = {"a": base[:6], "b": base[6:], "t": base.reshape(3, 4).t(), "p": param, "g": grad}
    back, buffers = _through_ray_style_pickle(Packed(value))
    # Only the Parameter's data (a plain tensor, which its own reducer pickles) went out of band.
    assert len(buffers) == 1
    assert isinstance(back["p"], torch.nn.Parameter)
    assert back["g"].requires_grad
    assert back["t"].stride() == (1, 4)
    assert all(torch.equal(back[k].detach(), value[k].detach()) for k in value)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_packed_value_pickles_at_any_protocol(protocol: int) -> None:
    t = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    back = pickle.loads(pickle.dumps(Packed((t, 1)), protocol=protocol))
    assert torch.equal(back[0], t)
    assert back[1] == 1
