"""Small model factories for the built-in datasets (plain ``nn.Module``s).

Each factory returns a fresh module; pass ``functools.partial(mlp, ...)`` where a zero-argument
``ModelFactory`` is expected. None of these models draws randomness in ``forward`` (no
dropout), so their training is a function of the client key alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from .keys import Key, key_generator

__all__ = [
    "ModelFactory",
    "build_module",
    "build_template",
    "cnn",
    "intra_op_threads",
    "logistic_regression",
    "mlp",
]


def logistic_regression(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (the model of the FedProx synthetic benchmark).

    Examples:
        >>> import torch
        >>> logistic_regression((60,), 10)(torch.zeros(4, 60)).shape
        torch.Size([4, 10])
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (200, 200)
) -> nn.Module:
    """A ReLU multilayer perceptron; the default is FedAvg's "2NN" (two layers of 200)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The classic small CNN: conv6-conv16 (5x5, max-pool 2) then fc120-fc84.

    Works for any ``(channels, height, width)`` with height and width >= 16 (e.g. MNIST's
    1x28x28 and CIFAR's 3x32x32).

    Raises:
        ValueError: ``input_shape`` is not (C, H, W) with H, W >= 16.
    """
    if len(input_shape) != 3 or min(input_shape[1:]) < 16:
        raise ValueError(f"cnn needs input_shape (C, H>=16, W>=16), got {input_shape}")
    channels, height, width = input_shape
    # Two valid 5x5 convolutions, each followed by a 2x2 max-pool.
    out_h = ((height - 4) // 2 - 4) // 2
    out_w = ((width - 4) // 2 - 4) // 2
    flat = 16 * out_h * out_w
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


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
