"""Client-side computation shared by the algorithms: local SGD, distillation, evaluation.

These functions work on a private deep copy of a template module, so they never write into the
template or into the parameter tensors they are given, and they are safe to run concurrently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
from torch.nn import functional as F

from ._module_copy import accumulate, load_params, mean_loss, sgd_step
from ._module_copy import working_copy as working_copy
from ._validators import finite_number, int_at_least
from .client_stages import GradientHook, chain, from_hook
from .data.datasets import ClientData, TensorDataset
from .data.transforms import Transform
from .keys import Key
from .local_training import LocalTraining, train
from .stochastic import keyed_rng
from .tree import Params, from_module

__all__ = [
    "Distillation",
    "GradientHook",
    "LocalSGD",
    "ProximalTerm",
    "distill",
    "evaluate",
    "evaluate_clients",
    "predict_probs",
    "train_local",
    "working_copy",
]


@attrs.frozen
class ProximalTerm:
    """FedProx's proximal term ``mu/2 * ||w - w_global||^2``: adds ``mu * (w - w_global)``.

    Examples:
        >>> import torch
        >>> ProximalTerm(0.5)(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([1.0]))
        tensor([2.])
    """

    mu: float = attrs.field(validator=finite_number(positive=False))

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor
    ) -> torch.Tensor:
        return grad.add(param - anchor, alpha=self.mu)


@attrs.frozen
class LocalSGD:
    """Hyperparameters of local training: plain mini-batch SGD (no momentum) on cross-entropy.

    FedAvg's local training; `training` gives it as the general `LocalTraining` (the hooks
    become a `chain` of `from_hook` stages).

    Attributes:
        transform: an optional augmentation applied to every training batch, drawing from the
            client key's ``"augment"`` child; it must be picklable to run in worker processes.
        hooks: `GradientHook`s applied in order to every gradient before each step.
        drop_last: leave out each epoch's final batch when it is smaller than ``batch_size``
            (`LocalTraining.drop_last`).
    """

    epochs: int = attrs.field(default=1, validator=int_at_least(1))
    batch_size: int = attrs.field(default=10, validator=int_at_least(1))
    lr: float = attrs.field(default=0.01, validator=finite_number(positive=True))
    transform: Transform | None = None
    hooks: tuple[GradientHook, ...] = attrs.field(default=(), converter=tuple)
    drop_last: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def training(self) -> LocalTraining:
        """This configuration as a `LocalTraining` (what `train_local` runs)."""
        optimizer = chain(*(from_hook(h) for h in self.hooks)) if self.hooks else None
        return LocalTraining(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=optimizer,
            augment=self.transform,
            drop_last=self.drop_last,
        )


def train_local(
    template: torch.nn.Module,
    params: Params,
    data: ClientData,
    key: Key,
    config: LocalSGD,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train a copy of ``template`` loaded with ``params`` on ``data``; shuffling uses ``key``.

    Returns:
        The trained parameters (new tensors) and ``{"loss": mean training loss}`` over every
        example seen (``nan`` if the client has no data; its parameters are returned unchanged).
        `blazefl_fn.local_training.train` gives the number of steps too.
    """
    trained = train(template, params, data, key, config.training())
    return trained.params, {"loss": trained.result.loss}


@attrs.frozen
class Distillation:
    """Hyperparameters of knowledge distillation: SGD on KL(soft labels || model)."""

    epochs: int = attrs.field(default=1, validator=int_at_least(1))
    batch_size: int = attrs.field(default=100, validator=int_at_least(1))
    lr: float = attrs.field(default=0.1, validator=finite_number(positive=True))


def distill(
    template: torch.nn.Module,
    params: Params,
    x: torch.Tensor,
    soft_labels: torch.Tensor,
    key: Key,
    config: Distillation,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train a copy of ``template`` loaded with ``params`` to match ``soft_labels`` on ``x``.

    The loss is ``KL(soft_labels || softmax(model(x)))`` averaged over each mini-batch; batches
    are shuffled with ``key``.

    Returns:
        The new parameters (new tensors) and ``{"distill_loss": mean loss}`` (``nan`` when
        ``x`` is empty; the parameters are then returned unchanged).

    Raises:
        ValueError: ``x`` and ``soft_labels`` differ in length.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 3)
        >>> params = {k: v.detach() for k, v in net.state_dict().items()}
        >>> x, soft = torch.randn(8, 2), torch.full((8, 3), 1 / 3)
        >>> new, metrics = distill(net, params, x, soft, Key.from_seed(0), Distillation())
        >>> sorted(new), metrics["distill_loss"] >= 0
        (['bias', 'weight'], True)
    """
    if x.shape[0] != soft_labels.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but soft_labels has {soft_labels.shape[0]}")
    module = load_params(template, params)
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    generator = key.torch_generator()
    loss_sum: torch.Tensor | float | None = None
    seen = 0
    with keyed_rng(key.fold_in("dropout")):
        for _ in range(config.epochs):
            # Drawn on the CPU and then moved: every device distills on the same batches.
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            for start in range(0, x.shape[0], config.batch_size):
                rows = order[start : start + config.batch_size]
                log_probs = F.log_softmax(module(x[rows]), dim=1)
                loss = F.kl_div(log_probs, soft_labels[rows], reduction="batchmean")
                loss.backward()  # pyright: ignore[reportUnknownMemberType]  # untyped in torch
                sgd_step(trainable, config.lr)
                loss_sum = accumulate(loss_sum, loss, int(rows.shape[0]))
                seen += int(rows.shape[0])
    return from_module(module), {"distill_loss": mean_loss(loss_sum, seen)}


def predict_probs(
    template: torch.nn.Module, params: Params, x: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """``softmax(model(x))`` of ``template`` loaded with ``params``, as float32 rows.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 3)
        >>> params = {k: v.detach() for k, v in net.state_dict().items()}
        >>> predict_probs(net, params, torch.randn(4, 2)).sum(dim=1).allclose(torch.ones(4))
        True
    """
    module = load_params(template, params)
    module.eval()
    with torch.inference_mode():
        if x.shape[0] == 0:
            return torch.empty(0, 0, device=x.device)
        rows = [
            F.softmax(module(x[start : start + batch_size]).float(), dim=1)
            for start in range(0, x.shape[0], batch_size)
        ]
    # Out of inference mode: the caller may use the result in autograd.
    return torch.cat(rows).clone()


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
