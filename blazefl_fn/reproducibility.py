"""Seeded model construction and thread settings: the one place that touches torch's global RNG.

``nn.Module`` constructors draw their initial weights from torch's global generator. To keep
library results a function of a `Key` only, `build_module` constructs a model inside
``torch.random.fork_rng`` with the global generator's whole state set from all 128 bits of the
key (as `Key.torch_generator` does), so the draws are reproducible and the caller's global
generator is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import cast

import torch

from ._streams import key_generator
from .keys import Key

__all__ = ["ModelFactory", "build_module", "build_template", "intra_op_threads"]

ModelFactory = Callable[[], torch.nn.Module]
"""Builds a fresh model from no arguments, e.g. ``functools.partial(mlp, (784,), 10)``."""


# A template only fixes the architecture; its values are always overwritten by a state.
_TEMPLATE_KEY = Key.from_seed(0).fold_in("template")


def build_template(model_fn: ModelFactory) -> torch.nn.Module:
    """The architecture template the algorithms load parameters into (fixed weights)."""
    return build_module(model_fn, _TEMPLATE_KEY)


def build_module(model_fn: ModelFactory, key: Key) -> torch.nn.Module:
    """Call ``model_fn`` with torch's global RNG keyed by ``key``; global RNG state is restored.

    The CPU generator's stream, and every CUDA device's, depends on all 128 bits of ``key``
    (each device gets the same stream). A factory that initialises CUDA itself
    (``nn.Linear(..., device="cuda")`` in a fresh process) is called a second time, now with
    CUDA keyed too, so its weights come from ``key`` as well; its first, discarded call drew on
    CUDA's default generators, which had no state to restore before CUDA existed.

    Not thread-safe (it swaps the process-global generator state): call it from the driving
    thread, never inside a client update.

    Examples:
        >>> import torch
        >>> a = build_module(lambda: torch.nn.Linear(2, 2), Key.from_seed(0))
        >>> b = build_module(lambda: torch.nn.Linear(2, 2), Key.from_seed(0))
        >>> bool(torch.equal(a.weight, b.weight))
        True
    """
    # Only an initialised CUDA is forked and keyed: initialising it here would cost every CPU
    # run on a GPU machine a CUDA context.
    cuda_before = torch.cuda.is_initialized()
    cuda = list(range(torch.cuda.device_count())) if cuda_before else []
    # torch leaves this signature partly unannotated.
    with torch.random.fork_rng(devices=cuda):  # pyright: ignore[reportUnknownMemberType]
        key_generator(torch.default_generator, key.bits)
        for index in cuda:
            key_generator(torch.cuda.default_generators[index], key.bits)
        # A user factory may return anything despite its annotation: check it at run time.
        module = cast(object, model_fn())
    if not cuda_before and torch.cuda.is_initialized():
        # The factory drew on a CUDA generator nobody had keyed: build again, keyed.
        return build_module(model_fn, key)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model_fn must return a torch.nn.Module, got {type(module).__name__}")
    return module


@contextmanager
def intra_op_threads(threads: int) -> Generator[None]:
    """Fix torch's intra-op thread count inside the block; the caller's setting is restored.

    A fixed count keeps CPU reductions split the same way in every run.

    Raises:
        ValueError: ``threads < 1``.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
