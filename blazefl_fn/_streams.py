"""Torch generators whose whole stream depends on all 128 bits of a key (stream version 2).

`torch.Generator.manual_seed` cannot carry a 128-bit key: the CPU generator (mt19937) keeps 32
bits of its seed, and CUDA's Philox generator 64. So a key is expanded instead:

- **CPU**: mt19937's whole state, 624 32-bit words, is SHAKE-128 output over a tag and the key's
  16 bytes, installed with `torch.Generator.set_state`. That state is torch's private
  ``CPUGeneratorImplState`` bytes; `_cpu_layout` checks it once per process against a generator
  that torch seeded itself (the seed, the position fields and the 624 words that mt19937's
  reference initialisation gives that seed must sit where this module writes them), so a torch
  that moves them fails loudly instead of drawing from a garbled state.
- **CUDA** (Philox-4x32-10: a 64-bit key, a counter): the seed is 64 bits and the counter's start
  (`torch.Generator.set_offset`) 60 more bits of SHAKE-128 over another tag and the key, both
  set through public methods. Two keys share a stream only if both 64-bit seeds agree and their
  offsets lie closer than the draws made, which for random 124 bits never happens in practice.

SHAKE-128 is the standard XOF (FIPS 202): the same bytes on every platform and Python version.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import threading

import numpy as np
import torch

_MT_WORDS = 624
_SEED_BYTES = 8
# CPUGeneratorImplState: u64 seed, i32 left, i32 seeded, u64 next, u64 state[624], then the
# normal-sample caches.
_WORDS_AT = 24
_TAG_MT19937 = b"blazefl_fn.streams.v2:mt19937"
_TAG_PHILOX = b"blazefl_fn.streams.v2:philox"
# A seed above 32 bits: the stored 64-bit seed and the 32 bits mt19937 keeps both show.
PROBE_SEED = (0x5EED << 32) | 5489


def _reference_mt19937(seed: int) -> list[int]:
    """mt19937's reference initialisation (``init_genrand``) of a 32-bit seed."""
    state = [seed & 0xFFFFFFFF]
    for i in range(1, _MT_WORDS):
        previous = state[-1]
        state.append((1812433253 * (previous ^ (previous >> 30)) + i) & 0xFFFFFFFF)
    return state


@functools.cache
def _cpu_layout() -> tuple[bytes, bytes]:
    """The CPU state's bytes between the seed and the words, and after the words, verified."""
    probe = torch.Generator()
    probe.manual_seed(PROBE_SEED)
    return layout_of(probe.get_state().numpy().tobytes())


def layout_of(raw: bytes) -> tuple[bytes, bytes]:
    """Split ``raw``, the state of a CPU generator seeded with `PROBE_SEED`, around its words.

    Raises:
        RuntimeError: ``raw`` is not laid out as this module writes states (torch changed).
    """
    end = _WORDS_AT + 8 * _MT_WORDS
    expected_words = np.array(_reference_mt19937(PROBE_SEED), dtype="<u8").tobytes()
    fields = np.frombuffer(raw[_SEED_BYTES:_WORDS_AT], dtype="<i4") if len(raw) >= end else None
    if (
        sys.byteorder != "little"
        or fields is None
        or int.from_bytes(raw[:_SEED_BYTES], "little") != PROBE_SEED
        or fields.tolist() != [1, 1, 0, 0]  # left = 1, seeded = 1, next = 0 (u64)
        or raw[_WORDS_AT:end] != expected_words
    ):
        raise RuntimeError(
            f"torch {torch.__version__} lays out its CPU generator state differently from what "
            "blazefl_fn writes (seed, left, seeded, next, 624 words), so it cannot make 128-bit "
            "streams; use a torch this blazefl_fn supports or report it"
        )
    return raw[_SEED_BYTES:_WORDS_AT], raw[end:]


def cpu_state(bits: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU generator state (a uint8 tensor for `torch.Generator.set_state`) of ``bits``.

    The stored seed (`torch.Generator.initial_seed`) is the key's first 64 bits, as before
    stream version 2; the draws come from the 624 words, which depend on all 128.

    Args:
        bits: the key's 16 bytes.
        out: a state of another key to overwrite (the fixed fields are already in place);
            None makes a new tensor.
    """
    words = np.frombuffer(hashlib.shake_128(_TAG_MT19937 + bits).digest(4 * _MT_WORDS), "<u4")
    if out is None:
        between, after = _cpu_layout()
        widened = words.astype("<u8").tobytes()
        return torch.frombuffer(
            bytearray(bits[:_SEED_BYTES] + between + widened + after), dtype=torch.uint8
        )
    raw = out.numpy()
    raw[:_SEED_BYTES] = np.frombuffer(bits[:_SEED_BYTES], np.uint8)
    raw[_WORDS_AT : _WORDS_AT + 8 * _MT_WORDS].view("<u8")[:] = words
    return out


# Each thread's last CPU state, rewritten for the next key: a client makes a generator or two,
# and making the state anew (concatenations, copies) cost a third of the generator's time.
_states = threading.local()


def _cpu_state_here(bits: bytes) -> torch.Tensor:
    state: torch.Tensor | None = getattr(_states, "state", None)
    if state is None:
        state = cpu_state(bits)
        _states.state = state
        return state
    return cpu_state(bits, out=state)


def philox_seed_offset(bits: bytes) -> tuple[int, int]:
    """The Philox seed (64 bits) and counter offset (60 bits, a multiple of 4) of ``bits``."""
    digest = hashlib.shake_128(_TAG_PHILOX + bits).digest(16)
    seed = int.from_bytes(digest[:8], "little")
    # Torch's CUDA offsets count in fours; 2**62 leaves room for 2**62 draws before wrapping.
    offset = (int.from_bytes(digest[8:], "little") >> 4) << 2
    return seed, offset


def key_generator(generator: torch.Generator, bits: bytes) -> torch.Generator:
    """Put ``generator`` (fresh or used, any device) at the start of the stream of ``bits``.

    Raises:
        ValueError: the generator's device has neither mt19937 nor a settable Philox offset.
    """
    if generator.device.type == "cpu":
        # set_state copies the state into the generator: the buffer can be reused at once.
        generator.set_state(_cpu_state_here(bits))
        return generator
    seed, offset = philox_seed_offset(bits)
    generator.manual_seed(seed)
    try:
        generator.set_offset(offset)
    except (RuntimeError, AttributeError) as exc:
        raise ValueError(
            f"cannot key a {generator.device.type} generator with all 128 bits of a Key "
            f"(its offset cannot be set: {str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from exc
    return generator
