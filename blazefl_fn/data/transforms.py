"""Deterministic batch transforms on image tensors ``(N, C, H, W)``.

Every transform is a pure function of its input and a `torch.Generator`: it returns a new
tensor, never mutates its input, and draws randomness only from the generator it is given
(never from torch's, numpy's or Python's global RNG). That makes the output a function of the
run's key tree, identical across threads, worker processes and executors.

A `Transform` is any callable ``(x, generator) -> Tensor``. The records below (`RandomCrop`,
`RandomHorizontalFlip`, `Normalize`, `Chain`) are frozen attrs classes, so transforms pickle
and travel to worker processes; `chain` composes them.

torchvision is not a dependency. If it is importable, its tensor transforms can be used by
wrapping them in a module-level callable taking ``(x, generator)`` and ignoring the generator;
note that torchvision draws from torch's *global* RNG, so such a transform is not covered by
blazefl_fn's determinism guarantee (its output depends on thread scheduling and on whatever
else touched the global RNG).

Examples:
    >>> import torch
    >>> t = cifar_train_transform()
    >>> x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> a = t(x, torch.Generator().manual_seed(1))
    >>> b = t(x, torch.Generator().manual_seed(1))
    >>> a.shape, bool(torch.equal(a, b))
    (torch.Size([4, 3, 32, 32]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "Chain",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Transform",
    "chain",
    "cifar_test_transform",
    "cifar_train_transform",
    "normalize",
    "random_crop",
    "random_horizontal_flip",
]

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A batch augmentation ``(batch, generator) -> new batch``; it draws only from the generator."""

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""CIFAR-10's per-channel mean of the training images in ``[0, 1]``."""
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""CIFAR-10's per-channel standard deviation of the training images in ``[0, 1]``."""
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
"""CIFAR-100's per-channel mean of the training images in ``[0, 1]``."""
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
"""CIFAR-100's per-channel standard deviation of the training images in ``[0, 1]``."""


def _check_4d(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")


def _check_crop(size: int, padding: int) -> None:
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"flip probability p must be in [0, 1], got {p}")


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != len(std) or not mean:
        raise ValueError(
            f"mean and std must be non-empty and of equal length, got {len(mean)} and {len(std)}"
        )
    for s in std:
        if s == 0 or not math.isfinite(s):
            raise ValueError(f"std must be finite and non-zero, got {tuple(std)}")


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (drawn on the CPU) on ``device``; to a GPU without stalling the host.

    A copy from ordinary host memory synchronises with the GPU; from pinned memory it is
    queued like a kernel, and the copy keeps the same values.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def random_crop(
    x: torch.Tensor, size: int, padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Zero-pad ``x`` by ``padding`` on each side, then crop a random ``size x size`` window
    per example (offsets uniform over all positions, drawn from ``generator``).

    Raises:
        ValueError: ``x`` is not 4-D, ``size`` < 1, ``padding`` < 0, or ``size`` exceeds the
            padded height or width.
    """
    _check_4d(x)
    _check_crop(size, padding)
    n, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    if size > hp or size > wp:
        raise ValueError(f"crop size {size} exceeds the padded image size {hp}x{wp}")
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    draw_device = generator.device
    top = torch.randint(0, hp - size + 1, (n,), generator=generator, device=draw_device)
    left = torch.randint(0, wp - size + 1, (n,), generator=generator, device=draw_device)
    window = torch.arange(size, device=x.device)
    rows = (_moved(top, x.device)[:, None] + window)[:, None, :, None]  # (N, 1, size, 1)
    cols = (_moved(left, x.device)[:, None] + window)[:, None, None, :]  # (N, 1, 1, size)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_horizontal_flip(
    x: torch.Tensor, generator: torch.Generator, p: float = 0.5
) -> torch.Tensor:
    """Flip each example left-right (along W) independently with probability ``p``.

    One uniform draw per example is taken from ``generator`` whatever ``p`` is.

    Raises:
        ValueError: ``x`` is not 4-D or ``p`` is outside ``[0, 1]``.
    """
    _check_4d(x)
    _check_p(p)
    u = torch.rand(x.shape[0], generator=generator, device=generator.device)
    flip = _moved(u < p, x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dimension 1).

    Raises:
        ValueError: ``x`` is not 4-D, ``mean``/``std`` lengths differ from each other or from
            the channel count, or ``std`` holds a zero or non-finite value.
    """
    _check_4d(x)
    _check_stats(mean, std)
    if len(mean) != x.shape[1]:
        raise ValueError(f"got {len(mean)} mean/std values for {x.shape[1]} channels")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    m = _moved(torch.tensor(list(mean), dtype=dtype), x.device)[None, :, None, None]
    s = _moved(torch.tensor(list(std), dtype=dtype), x.device)[None, :, None, None]
    return (x.to(dtype) - m) / s


def _as_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an int, got {type(value).__name__}: {value!r}")
    return value


def _as_floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@attrs.frozen
class RandomCrop:
    """`random_crop` as a picklable `Transform`."""

    size: int = attrs.field(converter=_as_int)
    padding: int = attrs.field(default=0, converter=_as_int)

    def __attrs_post_init__(self) -> None:
        _check_crop(self.size, self.padding)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_crop(x, self.size, self.padding, generator)


@attrs.frozen
class RandomHorizontalFlip:
    """`random_horizontal_flip` as a picklable `Transform`."""

    p: float = attrs.field(default=0.5, converter=float)

    def __attrs_post_init__(self) -> None:
        _check_p(self.p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_horizontal_flip(x, generator, self.p)


@attrs.frozen
class Normalize:
    """`normalize` as a picklable `Transform` (the generator is not used)."""

    mean: tuple[float, ...] = attrs.field(converter=_as_floats)
    std: tuple[float, ...] = attrs.field(converter=_as_floats)

    def __attrs_post_init__(self) -> None:
        _check_stats(self.mean, self.std)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


@attrs.frozen
class Chain:
    """Apply ``transforms`` left to right, all drawing from the same generator in turn."""

    transforms: tuple[Transform, ...]

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x, generator)
        return x


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right; picklable when every part is.

    Raises:
        TypeError: A part is not callable.
    """
    for t in transforms:
        if not callable(t):
            raise TypeError(f"transforms must be callable, got {type(t).__name__}: {t!r}")
    return Chain(tuple(transforms))


def cifar_train_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> Transform:
    """The standard CIFAR augmentation: random 32x32 crop with 4 pixels of zero padding, random
    horizontal flip (p = 0.5), then per-channel normalisation."""
    return chain(RandomCrop(32, 4), RandomHorizontalFlip(0.5), Normalize(mean, std))


def cifar_test_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> Transform:
    """Evaluation-time CIFAR preprocessing: per-channel normalisation only."""
    return Normalize(mean, std)
