"""The client's optimizer as a chain of small named stages over the parameter tree.

Local training (`blazefl_fn.client.training.train`) takes, at every step, the gradients of the
trainable parameters by name, passes them through a `GradientTransform` (a chain of stages:
corrections, momentum, ...), and steps ``p <- p - lr * direction``. Loss terms add to the
training loss before the backward pass (FedDyn's regulariser).

A stage sees a `StepInput`: the current parameters, the anchor (their values at the start of
local training, i.e. the downlink's) and named trees the client update supplies (SCAFFOLD's
control variates ``"c"`` and ``"c_i"``, FedDyn's ``"grad"``). Its state is a tree too, so it can
be stored as client state between rounds (`chain` packs its stages' states by index).

==========================  ==================================================================
stage                       direction
==========================  ==================================================================
`add_proximal` (mu)         ``g + mu * (w - anchor)`` (FedProx's term, in its one form)
`add_proximal_to` (name)    ``g + mu * (w - tree)`` toward a supplied tree (Ditto's global model)
`train_only` (patterns)     ``g`` for the matching parameters only; the others are not stepped
`freeze` (patterns)         ``g`` for all but the matching parameters (FedRep's two phases)
`add_trees` (plus, minus)   ``g + sum(plus trees) - sum(minus trees)`` (SCAFFOLD's ``c - c_i``)
`momentum` (beta)           ``m <- beta * m + g``; ``m`` (torch SGD's heavy ball)
==========================  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import attrs
import torch

from .._validators import finite_number
from ..tree import Params, pack, unpack

__all__ = [
    "GradientTransform",
    "InnerProduct",
    "LossTerm",
    "StepInput",
    "add_proximal",
    "add_proximal_to",
    "add_trees",
    "chain",
    "freeze",
    "identity",
    "matches",
    "momentum",
    "train_only",
]

Tree = dict[str, torch.Tensor]


def _finite(_instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value!r}")


@attrs.frozen(eq=False)
class StepInput:
    """What a stage sees at one local step besides the gradients.

    Attributes:
        params: the current trainable parameters by name (read-only views; never write).
        anchor: their values when local training started (the downlink's).
        trees: named trees the client update supplies for this client, e.g. ``"c"``.
        step: the 0-based index of this step in the client's local training.
    """

    params: Params
    anchor: Params
    trees: Mapping[str, Params]
    step: int

    def tree(self, name: str) -> Params:
        """The supplied tree ``name``.

        Raises:
            KeyError: no tree of that name was supplied (the message lists those that were).
        """
        try:
            return self.trees[name]
        except KeyError:
            raise KeyError(
                f"no tree {name!r} was supplied to local training (got {sorted(self.trees)})"
            ) from None


class GradientTransform(Protocol):
    """A stage of the client optimizer: gradients in, a step direction out (optax-style).

    ``init`` makes the stage's state from the trainable parameters (an empty tree for stateless
    stages); ``update`` maps the gradients (only parameters that received one) to directions
    and returns the new state. Neither may write into its arguments. Stages must be picklable
    to run in worker processes.
    """

    def init(self, params: Params) -> Tree:
        """The initial state."""
        ...

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        """The directions and the next state."""
        ...


@attrs.frozen
class _Chain:
    stages: tuple[GradientTransform, ...]

    def init(self, params: Params) -> Tree:
        return pack({str(i): stage.init(params) for i, stage in enumerate(self.stages)})

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        states: dict[str, Params] = {}
        out: Params = grads
        for i, stage in enumerate(self.stages):
            out, states[str(i)] = stage.update(out, unpack(state, str(i)), inputs)
        return dict(out), pack(states)


def chain(*stages: GradientTransform) -> GradientTransform:
    """The stages applied in order; the state holds each stage's under its index.

    Examples:
        >>> import torch
        >>> opt = chain(add_proximal(0.5), momentum(0.9))
        >>> w, g = {"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])}
        >>> inputs = StepInput(params=w, anchor={"w": torch.tensor([1.0])}, trees={}, step=0)
        >>> direction, state = opt.update(g, opt.init(w), inputs)
        >>> direction, sorted(state)
        ({'w': tensor([2.])}, ['1/w'])
    """
    return _Chain(tuple(stages))


@attrs.frozen
class _Identity:
    def init(self, params: Params) -> Tree:
        return {}

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        return dict(grads), {}


def identity() -> GradientTransform:
    """The plain gradient: local training is then SGD."""
    return _Identity()


@attrs.frozen
class _Proximal:
    mu: float = attrs.field(validator=finite_number(positive=False))

    def init(self, params: Params) -> Tree:
        return {}

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        return {
            n: g.add(inputs.params[n] - inputs.anchor[n], alpha=self.mu) for n, g in grads.items()
        }, {}


def add_proximal(mu: float) -> GradientTransform:
    """FedProx's term ``mu/2 ||w - anchor||^2`` as its gradient ``mu * (w - anchor)``.

    The one form of FedProx's term (`blazefl_fn.algorithms.fedprox` uses it); vectorised
    training runs it for a whole chunk of clients through ``vmap``.

    Raises:
        ValueError: ``mu`` is negative or not finite.
    """
    return _Proximal(mu)


@attrs.frozen
class _ProximalTo:
    name: str
    mu: float = attrs.field(validator=finite_number(positive=False))

    def init(self, params: Params) -> Tree:
        return {}

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        target = inputs.tree(self.name)
        return {n: g.add(inputs.params[n] - target[n], alpha=self.mu) for n, g in grads.items()}, {}


def add_proximal_to(name: str, mu: float) -> GradientTransform:
    """The gradient of ``mu/2 ||w - tree||^2`` toward the supplied tree ``name``.

    `add_proximal` anchors at the parameters local training started from; this pulls toward
    any tree the client update supplies, e.g. Ditto's personal model toward the round's
    global model while training from the client's own one (`blazefl_fn.algorithms.ditto`).

    Raises:
        ValueError: ``mu`` is negative or not finite, or ``name`` is empty.

    Examples:
        >>> import torch
        >>> w, g = {"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])}
        >>> inputs = StepInput(params=w, anchor=w, trees={"global": {"w": torch.tensor([1.0])}},
        ...                    step=0)
        >>> add_proximal_to("global", 0.5).update(g, {}, inputs)[0]
        {'w': tensor([2.])}
    """
    if not isinstance(name, str) or not name:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"add_proximal_to needs a tree name, got {name!r}")
    return _ProximalTo(name, mu)


def _patterns(patterns: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not patterns:
        raise ValueError(f"{what} needs at least one parameter name or prefix")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip(".") or pattern != pattern.strip():  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"{what}: {pattern!r} is not a parameter name or prefix")
    return tuple(patterns)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether parameter ``name`` is one of ``patterns`` or lies under one (a module prefix).

    ``"fc"`` (or ``"fc."``) matches ``"fc"``, ``"fc.weight"`` and ``"fc.bias"``, not
    ``"fc2.weight"``.

    Examples:
        >>> [matches(n, ("5",)) for n in ("5.weight", "5", "51.bias", "3.weight")]
        [True, True, False, False]
    """
    return any(name in (p, p.rstrip(".")) or name.startswith(p.rstrip(".") + ".") for p in patterns)


@attrs.frozen
class _Select:
    patterns: tuple[str, ...]
    keep: bool

    def init(self, params: Params) -> Tree:
        return {}

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        return {n: g for n, g in grads.items() if matches(n, self.patterns) == self.keep}, {}


def train_only(*patterns: str) -> GradientTransform:
    """Directions for the parameters ``patterns`` name (names or module prefixes) only.

    The others get no direction, so local training leaves them bit for bit as they were (the
    stages after this one do not see them). FedRep's head phase is ``train_only(*head)``.

    Raises:
        ValueError: no pattern, or an empty one.

    Examples:
        >>> import torch
        >>> g = {"0.weight": torch.ones(1), "1.weight": torch.ones(1)}
        >>> inputs = StepInput(params=g, anchor=g, trees={}, step=0)
        >>> sorted(train_only("1").update(g, {}, inputs)[0])
        ['1.weight']
    """
    return _Select(_patterns(patterns, "train_only"), keep=True)


def freeze(*patterns: str) -> GradientTransform:
    """Directions for every parameter except those ``patterns`` name (names or prefixes).

    Raises:
        ValueError: no pattern, or an empty one.

    Examples:
        >>> import torch
        >>> g = {"0.weight": torch.ones(1), "1.weight": torch.ones(1)}
        >>> inputs = StepInput(params=g, anchor=g, trees={}, step=0)
        >>> sorted(freeze("1").update(g, {}, inputs)[0])
        ['0.weight']
    """
    return _Select(_patterns(patterns, "freeze"), keep=False)


@attrs.frozen
class _AddTrees:
    plus: tuple[str, ...]
    minus: tuple[str, ...]

    def init(self, params: Params) -> Tree:
        return {}

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        plus = [inputs.tree(name) for name in self.plus]
        minus = [inputs.tree(name) for name in self.minus]
        out: Tree = {}
        for n, g in grads.items():
            # The correction first, then one addition: zero trees leave ``g`` bit for bit.
            correction = torch.zeros_like(g)
            for tree in plus:
                correction = correction + tree[n]
            for tree in minus:
                correction = correction - tree[n]
            out[n] = g + correction
        return out, {}


def add_trees(plus: tuple[str, ...] = (), minus: tuple[str, ...] = ()) -> GradientTransform:
    """Adds the supplied trees named in ``plus`` and subtracts those in ``minus``.

    SCAFFOLD's corrected gradient ``g + c - c_i`` is ``add_trees(plus=("c",), minus=("c_i",))``.

    Raises:
        ValueError: no tree is named.
    """
    if not plus and not minus:
        raise ValueError("add_trees needs at least one tree name")
    return _AddTrees(tuple(plus), tuple(minus))


@attrs.frozen
class _Momentum:
    beta: float

    def init(self, params: Params) -> Tree:
        return {n: torch.zeros_like(p) for n, p in params.items()}

    def update(self, grads: Params, state: Params, inputs: StepInput) -> tuple[Tree, Tree]:
        new = dict(state)
        for n, g in grads.items():
            new[n] = state[n].mul(self.beta).add(g)
        return {n: new[n] for n in grads}, new


def momentum(beta: float) -> GradientTransform:
    """Heavy-ball momentum as torch's SGD computes it: ``m <- beta * m + g``, step along ``m``.

    Its state (``m`` by name) may persist between rounds as client state.

    Raises:
        ValueError: ``beta`` not in ``[0, 1)``.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
    return _Momentum(float(beta))


class LossTerm(Protocol):
    """A term added to the training loss, differentiated with it (e.g. a regulariser).

    Called with the live trainable parameters by name (they require grad) and the step's
    `StepInput`; returns a scalar tensor. Must be picklable to run in worker processes.
    """

    def __call__(self, params: Params, inputs: StepInput) -> torch.Tensor: ...


@attrs.frozen
class InnerProduct:
    """``weight * <tree, w>`` for the supplied tree ``name`` (FedDyn's linear term has -1).

    Examples:
        >>> import torch
        >>> w = {"w": torch.tensor([3.0], requires_grad=True)}
        >>> inputs = StepInput(params=w, anchor=w, trees={"h": {"w": torch.tensor([2.0])}}, step=0)
        >>> InnerProduct("h", -1.0)(w, inputs)
        tensor(-6., grad_fn=<MulBackward0>)
    """

    name: str
    weight: float = attrs.field(default=1.0, validator=_finite)

    def __call__(self, params: Params, inputs: StepInput) -> torch.Tensor:
        tree = inputs.tree(self.name)
        total = sum(((tree[n] * p).sum() for n, p in params.items()))
        return torch.as_tensor(total) * self.weight
