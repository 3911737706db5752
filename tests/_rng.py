"""A check that code under test draws nothing from the global random generators."""

from __future__ import annotations

import random
from collections.abc import Generator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def global_rng_untouched() -> Generator[None]:
    """Fail if the block changes torch's, numpy's legacy or Python's global RNG state."""
    torch_state = torch.random.get_rng_state()
    # Reading the legacy global state is the only way to see whether anyone drew from it.
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002
    python_state = random.getstate()
    yield
    assert torch.equal(torch.random.get_rng_state(), torch_state), "torch global RNG was used"
    after = np.random.get_state(legacy=False)  # noqa: NPY002
    assert np.array_equal(after["state"]["key"], numpy_state["state"]["key"])
    assert after["state"]["pos"] == numpy_state["state"]["pos"], "numpy global RNG was used"
    assert random.getstate() == python_state, "python's random module was used"
