"""The benchmark's models, defined with torch alone so that every framework's venv builds them.

- `cnn`: the same architecture, parameter names and shapes as
  ``blazefl_fn.models.cnn((3, 32, 32), 10)`` (a test checks it).
- `resnet18`: the usual CIFAR ResNet-18 (3x3 stem, no max-pool, four stages of two basic
  blocks, 64-128-256-512 channels). BatchNorm keeps no running statistics
  (``track_running_stats=False``), so the state is parameters only: every framework averages
  exactly the same tensors, and none has to decide how to average integer buffers.

Neither model draws randomness in ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["build", "cnn", "resnet18"]


def cnn(input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """Conv6-conv16 (5x5, max-pool 2) then fc120-fc84: blazefl_fn's ``cnn``."""
    channels, height, width = input_shape
    flat = 16 * (((height - 4) // 2 - 4) // 2) * (((width - 4) // 2 - 4) // 2)
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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs, track_running_stats=False)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs, track_running_stats=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                nn.BatchNorm2d(outputs, track_running_stats=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18(input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-18 (11.2 M parameters for 10 classes)."""
    layers: list[nn.Module] = [
        nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64, track_running_stats=False),
        nn.ReLU(),
    ]
    width = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
        width = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def build(name: str, num_classes: int = 10) -> nn.Module:
    """The model called ``name`` for 3x32x32 inputs.

    Raises:
        ValueError: an unknown name.
    """
    if name == "cnn":
        return cnn((3, 32, 32), num_classes)
    if name == "resnet18":
        return resnet18((3, 32, 32), num_classes)
    raise ValueError(f"unknown model {name!r} (cnn, resnet18)")
