"""Server-side arithmetic shared by the algorithms that treat trainable parameters and buffers
differently (SCAFFOLD, FedDyn, FedNova): buffers are the example-weighted mean of the clients'."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tree import Params, weighted_mean


def merge_buffers(
    new_params: Params, state_params: Params, models: Sequence[Params], weights: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The next global model: ``new_params`` for the trainable entries, and every other entry
    of ``state_params`` (BatchNorm statistics, counters) as the clients' weighted mean (kept
    if no client has examples). Names keep ``state_params``' order."""
    others = [name for name in state_params if name not in new_params]
    buffers: dict[str, torch.Tensor] = {}
    if others and sum(weights) > 0:
        buffers = weighted_mean([{n: m[n] for n in others} for m in models], weights)
    return {
        name: new_params[name] if name in new_params else buffers.get(name, tensor)
        for name, tensor in state_params.items()
    }


def zeros_like(params: Params) -> dict[str, torch.Tensor]:
    """A zero tree of ``params``' names, shapes, dtypes and devices."""
    return {n: torch.zeros_like(t) for n, t in params.items()}
