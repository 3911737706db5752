"""Peak Python-heap allocation of a block, for tests that bound what hostile input may cost."""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Iterator

import attrs


@attrs.define
class Peak:
    """The traced peak in bytes, set when the block ends."""

    bytes: int = 0


@contextlib.contextmanager
def traced_peak() -> Iterator[Peak]:
    """Trace allocations in the block; the yielded `Peak` holds its peak afterwards."""
    peak = Peak()
    tracemalloc.start()
    try:
        yield peak
        peak.bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
