"""The random-key tree: every random draw in blazefl_fn descends from one `Key`.

A `Key` is 128 bits. Children are derived with BLAKE2b (16-byte digest, personalisation
``b"blazefl_fn.key"``) over ``tag || parent bits || payload``, where ``tag`` is one of

- ``b"split"`` with the child index as 8 little-endian bytes (``split``),
- ``b"fold:int"`` with the integer as 8 little-endian bytes (``fold_in(int)``),
- ``b"fold:str"`` with the UTF-8 bytes of the string (``fold_in(str)``).

The tags are prefix-free, so no split child can coincide with a fold child, and the derivation
depends only on ``hashlib``: keys are identical across Python, numpy and torch versions and
platforms. A root key is ``BLAKE2b(b"seed" || seed as 16 little-endian bytes)``.

Structural randomness (client sampling, permutations) is computed from a raw bit stream of the
key (BLAKE2b in counter mode, tag ``b"stream"``), never from numpy's or torch's distribution
code, so it is stable across library versions too.

Every generator a key makes depends on all 128 bits (`STREAMS_VERSION` 2): torch's CPU
generator gets its whole mt19937 state from the key, a CUDA generator its Philox seed and
counter offset, and numpy's Philox takes the 128 bits as its key. Two keys that differ in any
bit give streams that are independent in practice.
"""

from __future__ import annotations

import fractions
import functools
import hashlib
import math
import sys
import threading
from collections.abc import Iterator
from typing import Final, cast

import attrs
import numpy as np
import torch

__all__ = [
    "STREAMS_VERSION",
    "Key",
]

STREAMS_VERSION: Final = 2
"""The version of the random streams a `Key` makes; every change to them changes results.

1. blazefl_fn 0.1: torch generators seeded with the key's first 64 bits (the CPU generator
   kept 32 of them).
2. blazefl_fn 0.2: every torch generator's whole stream depends on all 128 bits.

Checkpoints record it; a run never resumes on other streams than it started on.
"""

_PERSON = b"blazefl_fn.key"
_U64 = 1 << 64


def _check_int(value: object, name: str, lo: int, hi: int) -> int:
    # bool is an int subclass; a True seed is almost certainly a bug in the caller.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if not lo <= value < hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}), got {value}")
    return value


def _hash(message: bytes, digest_size: int = 16) -> bytes:
    return hashlib.blake2b(message, digest_size=digest_size, person=_PERSON).digest()


def _check_bits(_instance: object, _attribute: object, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != 16:
        raise ValueError(f"Key bits must be 16 bytes, got {value!r}")


@attrs.frozen(repr=False)
class Key:
    """A 128-bit node of the key tree; frozen, hashable and picklable.

    Examples:
        >>> root = Key.from_seed(0)
        >>> round_key = root.fold_in(3)
        >>> a, b = round_key.split(2)
        >>> a != b and round_key.fold_in(7) == root.fold_in(3).fold_in(7)
        True
    """

    bits: bytes = attrs.field(validator=_check_bits)

    @classmethod
    def from_seed(cls, seed: int) -> Key:
        """The root key of a run.

        Raises:
            TypeError: ``seed`` is not an int.
            ValueError: ``seed`` is negative or does not fit in 128 bits.
        """
        seed = _check_int(seed, "seed", 0, 1 << 128)
        return cls(_hash(b"seed" + seed.to_bytes(16, "little")))

    def split(self, n: int = 2) -> tuple[Key, ...]:
        """``n`` independent children; child ``i`` does not depend on ``n``."""
        n = _check_int(n, "n", 0, _U64)
        return tuple(Key(_hash(b"split" + self.bits + i.to_bytes(8, "little"))) for i in range(n))

    def fold_in(self, data: int | str) -> Key:
        """The child named by ``data``: a non-negative integer below 2**64, or a string."""
        if isinstance(data, str):
            return Key(_hash(b"fold:str" + self.bits + data.encode("utf-8")))
        data = _check_int(data, "fold_in data", 0, _U64)
        return Key(_hash(b"fold:int" + self.bits + data.to_bytes(8, "little")))

    # -- materialisation ---------------------------------------------------------------------

    def torch_generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """A fresh `torch.Generator` on ``device`` whose whole stream depends on all 128 bits.

        On the CPU the key fills mt19937's entire state (624 words of SHAKE-128 output); on
        CUDA it sets the Philox seed (64 bits) and counter offset (60 bits). Equal keys give
        equal streams; keys that differ in any bit give independent ones.

        Raises:
            ValueError: ``device``'s generator can be keyed neither way.

        Examples:
            >>> import torch
            >>> a = torch.randperm(5, generator=Key.from_seed(0).torch_generator())
            >>> b = torch.randperm(5, generator=Key.from_seed(0).torch_generator())
            >>> bool(torch.equal(a, b))
            True
        """
        return key_generator(torch.Generator(device=device), self.bits)

    def numpy_generator(self) -> np.random.Generator:
        """A fresh numpy Generator over Philox keyed by all 128 bits."""
        return np.random.Generator(np.random.Philox(key=int.from_bytes(self.bits, "little")))

    # -- structural randomness from raw bits ---------------------------------------------------

    def words(self) -> Iterator[int]:
        """An endless stream of uniform 64-bit integers drawn from the key's raw bits."""
        counter = 0
        while True:
            block = _hash(b"stream" + self.bits + counter.to_bytes(8, "little"), digest_size=64)
            for offset in range(0, 64, 8):
                yield int.from_bytes(block[offset : offset + 8], "little")
            counter += 1

    def randbelow(self, n: int) -> int:
        """A uniform integer in ``[0, n)``."""
        return _randbelow(self.words(), _check_int(n, "n", 1, _U64))

    def permutation(self, n: int) -> list[int]:
        """A uniform random permutation of ``range(n)`` (Fisher-Yates over the bit stream).

        Examples:
            >>> sorted(Key.from_seed(1).permutation(5))
            [0, 1, 2, 3, 4]
        """
        n = _check_int(n, "n", 0, _U64)
        stream = self.words()
        out = list(range(n))
        for i in range(n - 1, 0, -1):
            j = _randbelow(stream, i + 1)
            out[i], out[j] = out[j], out[i]
        return out

    def choice(self, n: int, k: int) -> tuple[int, ...]:
        """``k`` distinct integers from ``range(n)``, uniformly, in draw order.

        Costs O(k) whatever ``n`` is (a sparse partial Fisher-Yates shuffle).

        Raises:
            ValueError: ``k > n`` or either is negative.
        """
        n = _check_int(n, "n", 0, _U64)
        k = _check_int(k, "k", 0, _U64)
        if k > n:
            raise ValueError(f"cannot choose k={k} distinct items from n={n}")
        stream = self.words()
        swapped: dict[int, int] = {}
        out: list[int] = []
        for i in range(k):
            j = i + _randbelow(stream, n - i)
            out.append(swapped.get(j, j))
            swapped[j] = swapped.get(i, i)
        return tuple(out)

    def bernoulli(self, n: int, rate: float) -> tuple[int, ...]:
        """The integers ``i`` in ``range(n)`` kept independently with probability ``rate``.

        Integer ``i`` is kept when the ``i``-th word of `words` is below
        ``floor(rate * 2**64)``: exact, and the same on every platform. Costs O(n) (hashed in
        bulk, about 0.1 s per million); this is Poisson sampling, as DP accountants assume.

        Raises:
            ValueError: ``n`` is negative or ``rate`` is not a number in ``[0, 1]``.

        Examples:
            >>> Key.from_seed(0).bernoulli(10, 0.0), Key.from_seed(0).bernoulli(3, 1.0)
            ((), (0, 1, 2))
        """
        n = _check_int(n, "n", 0, _U64)
        value = cast(object, rate)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0.0 <= rate <= 1.0  # also refuses NaN
        ):
            raise ValueError(f"rate must be a number in [0, 1], got {rate!r}")
        if rate == 1.0:
            return tuple(range(n))
        threshold = math.floor(fractions.Fraction(rate) * _U64)
        blocks = -(-n // 8)
        raw = b"".join(
            _hash(b"stream" + self.bits + counter.to_bytes(8, "little"), digest_size=64)
            for counter in range(blocks)
        )
        words = np.frombuffer(raw, dtype="<u8")[:n]
        return tuple(int(i) for i in np.flatnonzero(words < np.uint64(threshold)))

    def __repr__(self) -> str:
        return f"Key(0x{self.bits.hex()})"


def _randbelow(stream: Iterator[int], n: int) -> int:
    # Rejection keeps the result exactly uniform: only words below a multiple of n are used.
    limit = _U64 - (_U64 % n)
    while True:
        word = next(stream)
        if word < limit:
            return word % n


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
