"""Stochastic layers that draw from the client's key, not from torch's global generator.

``nn.Dropout`` draws from torch's global RNG, which every thread and process shares and no
key controls: the same seed then gives different bits on different executors. `KeyedDropout`
(and the functional `dropout`) draw from a generator made from a `Key` instead. Local training
(`blazefl_fn.client.training.train`, `blazefl_fn.client.distillation.distill`) makes each
client's ``key.fold_in("dropout")`` the current key while it runs, so a model built with
`KeyedDropout` is reproducible on every executor without further code. Elsewhere, set a key
with `keyed_rng`.

Executors check that a client update left torch's global RNG as it found it
(`blazefl_fn.executors.jobs.ClientJob`), so a forgotten ``nn.Dropout`` is an error, not silent
drift.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from ..keys import Key

__all__ = ["KeyedDropout", "current_generator", "dropout", "keyed_rng"]


class _Generators:
    """One generator per device, all seeded from one key (made on first use)."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.made: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        generator = self.made.get(device)
        if generator is None:
            generator = self.key.torch_generator(device)
            self.made[device] = generator
        return generator


# A context variable: each thread (and each asyncio task) sees its own current key.
_current: ContextVar[_Generators | None] = ContextVar("blazefl_fn_keyed_rng", default=None)


@contextmanager
def keyed_rng(key: Key) -> Generator[None]:
    """Make ``key`` the source of `KeyedDropout` draws in this thread for the ``with`` block.

    Examples:
        >>> import torch
        >>> layer = KeyedDropout(0.5)
        >>> with keyed_rng(Key.from_seed(0)):
        ...     a = layer(torch.ones(8))
        >>> with keyed_rng(Key.from_seed(0)):
        ...     b = layer(torch.ones(8))
        >>> bool(torch.equal(a, b))
        True
    """
    token = _current.set(_Generators(key))
    try:
        yield
    finally:
        _current.reset(token)


def current_generator(device: torch.device) -> torch.Generator:
    """The generator on ``device`` of the key `keyed_rng` set in this thread.

    Raises:
        RuntimeError: no key is set (outside local training and `keyed_rng`).
    """
    generators = _current.get()
    if generators is None:
        raise RuntimeError(
            "KeyedDropout in training mode needs a key: it runs inside blazefl_fn's local "
            "training, or inside `with blazefl_fn.client.stochastic.keyed_rng(key):`"
        )
    return generators.on(device)


def dropout(
    x: torch.Tensor, p: float, generator: torch.Generator, training: bool = True
) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by ``1/(1-p)``.

    Draws only from ``generator`` (on ``x``'s device); ``x`` is not written into.

    Raises:
        ValueError: ``p`` not in ``[0, 1)``.

    Examples:
        >>> import torch
        >>> out = dropout(torch.ones(4), 0.5, Key.from_seed(0).torch_generator())
        >>> sorted(set(out.tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep * (1.0 / (1.0 - p))


class KeyedDropout(nn.Module):
    """``nn.Dropout`` that draws from the current client's key (see `keyed_rng`).

    In eval mode it is the identity, as ``nn.Dropout`` is.

    Raises:
        ValueError: ``p`` not in ``[0, 1)``.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with dropout applied in training mode."""
        if not self.training or self.p == 0.0:
            return x
        return dropout(x, self.p, current_generator(x.device))

    def extra_repr(self) -> str:
        """What ``print(module)`` shows."""
        return f"p={self.p}"
