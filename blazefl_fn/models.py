"""Small model factories for the built-in datasets (plain ``nn.Module``s).

Each factory returns a fresh module; pass ``functools.partial(mlp, ...)`` where a zero-argument
``ModelFactory`` is expected. None of these models draws randomness in ``forward`` (no
dropout), so their training is a function of the client key alone.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["cnn", "logistic_regression", "mlp"]


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
