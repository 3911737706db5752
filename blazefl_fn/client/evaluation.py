"""How well parameters fit data: accuracy and loss on a dataset, or on each client's own data.

`evaluate` runs a model loaded with some parameters over a test set in inference mode;
`evaluate_clients` evaluates one set of parameters on every client's own examples and
summarises the spread (mean, uniform mean, 10th percentile). Both work on a private copy of
the template module, so they never write into the model or the parameters they are given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from ..data.datasets import ClientData, TensorDataset
from ..tree import Params
from ._module_copy import load_params
from ._module_copy import working_copy as working_copy

__all__ = [
    "evaluate",
    "evaluate_clients",
]


def evaluate(
    template: torch.nn.Module, params: Params, data: TensorDataset, batch_size: int = 1000
) -> dict[str, float]:
    """Accuracy and mean cross-entropy loss of ``params`` on ``data``.

    Raises:
        ValueError: ``data`` is empty.
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    module = load_params(template, params)
    module.eval()
    loss_sum = 0.0
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = data.x[start : start + batch_size]
            y = data.y[start : start + batch_size]
            logits = module(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    return {"accuracy": correct / len(data), "loss": loss_sum / len(data)}


def evaluate_clients(
    template: torch.nn.Module,
    params: Params,
    clients: Sequence[ClientData],
    batch_size: int = 1000,
) -> dict[str, float]:
    """How well ``params`` fits each client's own data, summarised over clients.

    Returns:
        ``client_accuracy`` (mean over clients weighted by their examples),
        ``client_accuracy_uniform`` (every client counts once) and ``client_accuracy_p10``
        (the 10th percentile over clients: how the worst-served clients fare). Clients without
        data are skipped.

    Raises:
        ValueError: every client is empty.
    """
    accuracies: list[float] = []
    sizes: list[int] = []
    for client in clients:
        if len(client) == 0:
            continue
        rows = client.indices
        local = TensorDataset(client.base.x[rows], client.base.y[rows])
        accuracies.append(evaluate(template, params, local, batch_size)["accuracy"])
        sizes.append(len(client))
    if not accuracies:
        raise ValueError("cannot evaluate clients: every client is empty")
    ordered = sorted(accuracies)
    # The nearest-rank percentile: an observed client's accuracy, not an interpolation.
    p10 = ordered[max(0, math.ceil(0.1 * len(ordered)) - 1)]
    return {
        "client_accuracy": sum(a * n for a, n in zip(accuracies, sizes, strict=True)) / sum(sizes),
        "client_accuracy_uniform": sum(accuracies) / len(accuracies),
        "client_accuracy_p10": p10,
    }
