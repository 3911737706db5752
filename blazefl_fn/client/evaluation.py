"""How well parameters fit data: accuracy and loss on a dataset, or on each client's own data.

`evaluate` runs a model loaded with some parameters over a test set in inference mode;
`evaluate_clients` evaluates one set of parameters, or each client's personal ones, on every
client's own examples and summarises the spread (mean, uniform mean, 10th percentile, standard
deviation). Both work on a private copy of
the template module, so they never write into the model or the parameters they are given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch.nn import functional as F

from ..data.datasets import ClientData, TensorDataset
from ..tree import Params
from ._module_copy import load_params
from ._module_copy import working_copy as working_copy

__all__ = [
    "PersonalTrees",
    "evaluate",
    "evaluate_clients",
]


class PersonalTrees(Protocol):
    """Each client's personal entries by client id (``{}``: none), as a
    `blazefl_fn.server.client_state.ClientStore` reads them."""

    def __getitem__(self, client_id: int, /) -> Params: ...


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
    *,
    personal: PersonalTrees | None = None,
) -> dict[str, float]:
    """How well ``params`` (or each client's personal parameters) fits each client's own data,
    summarised over clients.

    Args:
        template: the model.
        params: the global parameters.
        clients: client ``k``'s evaluation data at index ``k`` (its training data, or its
            held-out split, `blazefl_fn.data.datasets.hold_out_clients`).
        batch_size: examples per forward pass.
        personal: each client's personal entries (e.g. ``state.aux.clients`` of a
            personalised algorithm): client ``k`` is evaluated with ``params`` updated by
            ``personal[k]`` (the global ones where it holds none).

    Returns:
        ``client_accuracy`` (mean over clients weighted by their examples),
        ``client_accuracy_uniform`` (every client counts once), ``client_accuracy_p10``
        (the 10th percentile over clients, nearest rank: how the worst-served clients fare)
        and ``client_accuracy_std`` (the standard deviation over clients, each counting once).
        Clients without data are skipped.

    Raises:
        ValueError: every client is empty.

    Examples:
        >>> from blazefl_fn.data.datasets import TensorDataset
        >>> net = torch.nn.Linear(1, 2, bias=False)
        >>> base = TensorDataset(torch.ones(4, 1), torch.tensor([0, 0, 1, 1]))
        >>> from blazefl_fn.server.client_state import ClientStore
        >>> clients = [ClientData(base, torch.tensor(rows)) for rows in ([0, 1], [2, 3])]
        >>> w = {"weight": torch.tensor([[1.0], [0.0]])}  # predicts class 0
        >>> own = ClientStore(2).updated({1: {"weight": torch.tensor([[0.0], [1.0]])}})
        >>> evaluate_clients(net, w, clients)["client_accuracy_uniform"]
        0.5
        >>> evaluate_clients(net, w, clients, personal=own)["client_accuracy_p10"]
        1.0
    """
    accuracies: list[float] = []
    sizes: list[int] = []
    for k, client in enumerate(clients):
        if len(client) == 0:
            continue
        rows = client.indices
        local = TensorDataset(client.base.x[rows], client.base.y[rows])
        mine = params if personal is None else {**params, **personal[k]}
        accuracies.append(evaluate(template, mine, local, batch_size)["accuracy"])
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
        "client_accuracy_std": _std(accuracies),
    }


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
