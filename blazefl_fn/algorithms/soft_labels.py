"""Soft-label aggregation for distillation-based FL: the client mean, ERA and Enhanced ERA."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validators import check_positive_finite

__all__ = ["enhanced_era", "entropy", "era", "mean_soft_labels"]


def _check_probs(probs: torch.Tensor) -> None:
    if probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(
            f"soft labels must be a 2-D float tensor (rows x classes), got {probs.dtype} "
            f"of shape {tuple(probs.shape)}"
        )


def mean_soft_labels(client_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The clients' soft labels averaged row by row, summed in float64 in the order given.

    Raises:
        ValueError: no clients, or the tensors differ in shape.

    Examples:
        >>> import torch
        >>> mean_soft_labels([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])])
        tensor([[0.7500, 0.2500]])
    """
    if not client_probs:
        raise ValueError("mean_soft_labels needs at least one client's soft labels")
    shape = client_probs[0].shape
    total = torch.zeros(shape, dtype=torch.float64, device=client_probs[0].device)
    for probs in client_probs:
        if probs.shape != shape:
            raise ValueError(
                f"soft labels differ in shape: {tuple(shape)} and {tuple(probs.shape)}"
            )
        total += probs.to(torch.float64)
    return (total / len(client_probs)).to(client_probs[0].dtype)


def era(probs: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Entropy Reduction Aggregation (DS-FL): ``softmax(probs / temperature)`` per row.

    A temperature below 1 sharpens the averaged labels (lowers their entropy).

    Raises:
        ValueError: ``temperature`` is not a finite number > 0, or ``probs`` is not 2-D float.

    Examples:
        >>> import torch
        >>> era(torch.tensor([[0.6, 0.4]]), temperature=0.1)
        tensor([[0.8808, 0.1192]])
    """
    temperature = check_positive_finite("temperature", temperature)
    _check_probs(probs)
    return torch.softmax(probs / temperature, dim=1)


def enhanced_era(probs: torch.Tensor, exponent: float = 2.0) -> torch.Tensor:
    """Enhanced ERA (SCARLET): ``p**exponent / sum(p**exponent)`` per row.

    ``exponent == 1`` normalises the rows, ``p / sum(p)`` (float64, rounded once: a row that
    sums to exactly 1 comes back bit for bit; an unnormalised one is scaled, as the formula
    says); ``exponent > 1`` lowers the rows' entropy, ``exponent < 1`` raises it. Unlike ERA
    it keeps the order of the classes and never turns a confident label into a flatter one.
    Computed in float64 (in log space) so that large exponents do not underflow.

    Raises:
        ValueError: ``exponent`` is not a finite number > 0, ``probs`` is not 2-D float, or it
            has a negative entry or a row summing to 0.

    Examples:
        >>> import torch
        >>> enhanced_era(torch.tensor([[0.6, 0.4]]), exponent=2.0)
        tensor([[0.6923, 0.3077]])
        >>> enhanced_era(torch.tensor([[2.0, 6.0]]), exponent=1.0)
        tensor([[0.2500, 0.7500]])
    """
    exponent = check_positive_finite("exponent", exponent)
    _check_probs(probs)
    if bool((probs < 0).any()) or bool((probs.sum(dim=1) <= 0).any()):
        raise ValueError("soft labels must be non-negative with every row summing to > 0")
    if exponent == 1:
        wide = probs.to(torch.float64)
        return (wide / wide.sum(dim=1, keepdim=True)).to(probs.dtype)
    # log(0) = -inf stays a zero after softmax; a row of one nonzero entry stays one-hot.
    logits = torch.log(probs.to(torch.float64)) * exponent
    return torch.softmax(logits, dim=1).to(probs.dtype)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """The Shannon entropy (nats) of each row, with ``0 log 0 = 0``.

    Examples:
        >>> import torch
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    _check_probs(probs)
    # ``0 - x`` rather than ``-x``: a certain row reads 0.0, not -0.0.
    terms = torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs))
    return 0.0 - terms.sum(dim=1)
