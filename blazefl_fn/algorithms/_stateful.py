"""Server-side arithmetic shared by the algorithms that treat trainable parameters and buffers
differently (the `Aggregate` stage, SCAFFOLD, FedDyn, FedNova): buffers are aggregated as they
are, without clipping or a server step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..tree import Params, weighted_mean

Combine = Callable[[Sequence[Params], Sequence[float]], dict[str, torch.Tensor]]


def merge_buffers(
    new_params: Params,
    state_params: Params,
    models: Sequence[Params],
    weights: Sequence[int],
    combine: Combine = weighted_mean,
) -> dict[str, torch.Tensor]:
    """The next global model: ``new_params`` for the trainable entries; every other entry of
    ``state_params`` from the clients' values: floating-point buffers (BatchNorm statistics)
    combined by ``combine`` (an aggregator, the example-weighted mean by default), integer
    ones (batch counters) by the weighted mean rounded to nearest. Kept if no client has
    examples. Names keep ``state_params``' order."""
    others = [name for name in state_params if name not in new_params]
    buffers: dict[str, torch.Tensor] = {}
    if others and sum(weights) > 0:
        floats = [n for n in others if state_params[n].is_floating_point()]
        counts = [n for n in others if not state_params[n].is_floating_point()]
        if floats:
            buffers.update(combine([{n: m[n] for n in floats} for m in models], weights))
        if counts:
            buffers.update(weighted_mean([{n: m[n] for n in counts} for m in models], weights))
    return {
        name: new_params[name] if name in new_params else buffers.get(name, tensor)
        for name, tensor in state_params.items()
    }


def zeros_like(params: Params) -> dict[str, torch.Tensor]:
    """A zero tree of ``params``' names, shapes, dtypes and devices."""
    return {n: torch.zeros_like(t) for n, t in params.items()}
