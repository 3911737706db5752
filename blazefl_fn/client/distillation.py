"""Client-side computation beside training: distillation, prediction, evaluation.

These functions work on a private deep copy of a template module, so they never write into the
template or into the parameter tensors they are given, and they are safe to run concurrently.
"""

from __future__ import annotations

import attrs
import torch
from torch.nn import functional as F

from .._validators import finite_number, int_at_least
from ..keys import Key
from ..tree import Params, from_module
from ._module_copy import accumulate, load_params, mean_loss, sgd_step
from ._module_copy import working_copy as working_copy
from .stochastic import keyed_rng

__all__ = [
    "Distillation",
    "distill",
    "predict_probs",
    "working_copy",
]


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
