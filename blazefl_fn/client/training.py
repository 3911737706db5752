"""Local training as a composition: data loss + loss terms -> gradients -> optimizer stages -> step.

`train` is the one local training loop of the library and `LocalTraining` its one
configuration. What differs between algorithms is data, not code: a `LocalTraining` record
names the optimizer (a `GradientTransform`, e.g. a `chain` of stages from
`blazefl_fn.client.optim`) and the loss terms, and the client update supplies named trees
(control variates, previous gradients) and optimizer state. `LocalSGD` (FedAvg's local
training) builds a `LocalTraining` with no stages.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch
from torch.nn import functional as F

from .._validators import finite_number, int_at_least
from ..data.datasets import ClientData
from ..data.transforms import Transform
from ..keys import Key
from ..tree import Params
from ._module_copy import (
    accumulate,
    load_params,
    mean_loss,
    sgd_step,
    state_of,
    train_mode,
    trainable,
)
from .optim import GradientTransform, LossTerm, StepInput
from .stochastic import keyed_rng

__all__ = ["LocalResult", "LocalSGD", "LocalTraining", "Trained", "train", "trainable_names"]


@attrs.frozen
class LocalTraining:
    """How a client trains: mini-batch steps ``p <- p - lr * direction`` on cross-entropy.

    Attributes:
        epochs: passes over the client's data.
        batch_size: examples per step (the last batch of an epoch may be smaller).
        lr: the step size.
        optimizer: maps the gradients to the step direction (`blazefl_fn.client.optim`);
            None steps along the plain gradient (SGD) by the fastest path.
        loss_terms: added to the mean cross-entropy of each batch before differentiating.
        augment: an optional augmentation of every training batch, drawing from the client
            key's ``"augment"`` child; picklable to run in worker processes.
        drop_last: leave out each epoch's final batch when it is smaller than ``batch_size``
            (`ClientData.batches`): a BatchNorm model cannot train on a batch of one example.
            A client with fewer examples than ``batch_size`` then takes no step.

    Examples:
        >>> from blazefl_fn.client.optim import add_trees, chain, momentum
        >>> scaffold_like = LocalTraining(lr=0.1, optimizer=chain(
        ...     add_trees(plus=("c",), minus=("c_i",)), momentum(0.9)))
        >>> scaffold_like.epochs, scaffold_like.batch_size
        (1, 10)
    """

    epochs: int = attrs.field(default=1, validator=int_at_least(1))
    batch_size: int = attrs.field(default=10, validator=int_at_least(1))
    lr: float = attrs.field(default=0.01, validator=finite_number(positive=True))
    optimizer: GradientTransform | None = None
    loss_terms: tuple[LossTerm, ...] = attrs.field(default=(), converter=tuple)
    augment: Transform | None = None
    drop_last: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


def LocalSGD(  # a constructor of `LocalTraining`, named as the record it once was
    *,
    epochs: int = 1,
    batch_size: int = 10,
    lr: float = 0.01,
    augment: Transform | None = None,
    drop_last: bool = False,
) -> LocalTraining:
    """Plain mini-batch SGD (no optimizer stages, no loss terms): FedAvg's local training.

    A `LocalTraining` with ``optimizer=None``; add stages with ``attrs.evolve(local,
    optimizer=...)`` or build a `LocalTraining` directly.

    Raises:
        ValueError: a hyperparameter out of range.

    Examples:
        >>> local = LocalSGD(lr=0.1)
        >>> type(local).__name__, local.lr, local.optimizer
        ('LocalTraining', 0.1, None)
    """
    return LocalTraining(
        epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, drop_last=drop_last
    )


@attrs.frozen
class LocalResult:
    """What happened in one client's local training (plain numbers).

    Attributes:
        examples: the client's training examples (its aggregation weight in FedAvg).
        steps: optimizer steps taken (``epochs * ceil(examples / batch_size)``; ``floor``
            with ``drop_last``).
        loss: mean cross-entropy over every example seen, loss terms excluded; ``nan``
            without data.
    """

    examples: int
    steps: int
    loss: float


@attrs.frozen(eq=False)
class Trained:
    """The outcome of `train`.

    Attributes:
        params: the trained parameters (new tensors; a model ``state_dict``).
        result: what happened.
        optimizer_state: the optimizer's final state (empty for stateless optimizers), to
            keep as client state for the next round if the algorithm wants it.
    """

    params: dict[str, torch.Tensor]
    result: LocalResult
    optimizer_state: dict[str, torch.Tensor]


def trainable_names(module: torch.nn.Module, *, aliases: bool = False) -> tuple[str, ...]:
    """The names of ``module``'s trainable parameters, in ``named_parameters`` order.

    Tied parameters appear once, under their first name, unless ``aliases`` (then under every
    name the ``state_dict`` has for them); frozen parameters and buffers never. The optimizer
    stages see exactly the names without aliases.

    Examples:
        >>> trainable_names(torch.nn.BatchNorm1d(2))
        ('weight', 'bias')
    """
    named = module.named_parameters(remove_duplicate=not aliases)
    return tuple(n for n, p in named if p.requires_grad)


_NO_TREES: Mapping[str, Params] = {}


def train(
    template: torch.nn.Module,
    params: Params,
    data: ClientData,
    key: Key,
    training: LocalTraining,
    *,
    trees: Mapping[str, Params] = _NO_TREES,
    optimizer_state: Params | None = None,
) -> Trained:
    """Train a copy of ``template`` loaded with ``params`` on ``data``, drawing from ``key``.

    Batches are shuffled with ``key``, augmentation draws from ``key.fold_in("augment")`` and
    `blazefl_fn.client.stochastic.KeyedDropout` from ``key.fold_in("dropout")``. Neither
    ``template``
    nor ``params`` nor ``trees`` is written into.

    Args:
        template: the model; a per-thread working copy of it is trained.
        params: its starting values (also the ``anchor`` the stages see).
        data: the client's data.
        key: the client's key for this round.
        training: the optimizer, loss terms and hyperparameters.
        trees: named trees the stages and loss terms read (`StepInput.tree`), each over
            `trainable_names` of ``template``.
        optimizer_state: the optimizer's state to start from (e.g. kept from the client's last
            round); None starts from ``training.optimizer.init``.

    Raises:
        ValueError: ``optimizer_state`` given without an optimizer.

    Examples:
        >>> import torch
        >>> from blazefl_fn.client.optim import add_proximal
        >>> from blazefl_fn.data.datasets import ClientData, TensorDataset
        >>> net = torch.nn.Linear(2, 2)
        >>> base = TensorDataset(torch.randn(20, 2), torch.randint(0, 2, (20,)))
        >>> out = train(net, net.state_dict(), ClientData(base, torch.arange(20)),
        ...             Key.from_seed(0), LocalTraining(optimizer=add_proximal(0.1)))
        >>> out.result.examples, out.result.steps
        (20, 2)
    """
    if optimizer_state is not None and training.optimizer is None:
        raise ValueError("optimizer_state was given but training has no optimizer")
    module = load_params(template, params)
    train_mode(module)
    named = trainable(module)
    generator = key.torch_generator()
    augment = key.fold_in("augment").torch_generator() if training.augment else None
    staged = training.optimizer is not None or bool(training.loss_terms)
    # Views of the live parameters: the stages read current values without copying them.
    current = {n: p.detach() for n, p in named} if staged else {}
    anchor = {n: p.detach().clone() for n, p in named} if staged else {}
    live = {n: p for n, p in named} if training.loss_terms else {}
    plain = [p for _, p in named]
    state: dict[str, torch.Tensor] = {}
    if training.optimizer is not None:
        state = (
            dict(optimizer_state)
            if optimizer_state is not None
            else training.optimizer.init(anchor)
        )
    loss_sum: torch.Tensor | float | None = None
    seen = steps = 0
    with keyed_rng(key.fold_in("dropout")):
        for _ in range(training.epochs):
            for batch, y in data.batches(
                training.batch_size, generator, drop_last=training.drop_last
            ):
                x = (
                    batch
                    if augment is None or not training.augment
                    else training.augment(batch, augment)
                )
                loss = F.cross_entropy(module(x), y)
                total = loss
                inputs = None
                if staged:  # the plain SGD path builds nothing per step
                    inputs = StepInput(params=current, anchor=anchor, trees=trees, step=steps)
                    for term in training.loss_terms:
                        total = total + term(live, inputs)
                total.backward()  # pyright: ignore[reportUnknownMemberType]  # untyped in torch
                if training.optimizer is None or inputs is None:
                    sgd_step(plain, training.lr)
                else:
                    state = _staged_step(named, training.optimizer, state, inputs, training.lr)
                loss_sum = accumulate(loss_sum, loss, int(y.shape[0]))
                seen += int(y.shape[0])
                steps += 1
    result = LocalResult(examples=len(data), steps=steps, loss=mean_loss(loss_sum, seen))
    return Trained(params=state_of(module), result=result, optimizer_state=state)


def _staged_step(
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: GradientTransform,
    state: dict[str, torch.Tensor],
    inputs: StepInput,
    lr: float,
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        grads = {n: p.grad for n, p in named if p.grad is not None}
        directions, new_state = optimizer.update(grads, state, inputs)
        for n, p in named:
            direction = directions.get(n)
            if direction is not None:
                p.add_(direction, alpha=-lr)
            p.grad = None
    return new_state
