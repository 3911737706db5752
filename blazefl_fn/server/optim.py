"""Server-side transforms of the round's update, composed like optax.

**Sign convention.** A round's update is ``delta = aggregated - params``: the aggregated
client parameters minus the global parameters, the ``Delta_t`` of Reddi et al. (2021). It
points the way the clients moved (it is the *negative* of the "pseudo-gradient"), so
transforms return updates that are **added**: ``new_params = params + update``
(`apply_updates`). FedAvg is ``sgd(1.0)``: ``params + (aggregated - params)``.

A `ServerTransform` is a frozen record with two pure methods, ``init(params) -> state`` and
``update(delta, state, params) -> (update, state)``; each state is a small frozen record of
`Params`, and `chain` composes transforms left to right. Transforms and states are plain
attrs records (no closures), so both pickle across process boundaries.

**Precision.** `round_delta` forms the delta of floating entries in float64: exact for float16
inputs, and for float32/bfloat16 inputs whenever the two values are within a factor 2**28 of
each other (or one is zero). Every transform computes and keeps its state in float64 and
returns updates in the dtype of the delta it was given; `apply_updates` adds in float64 and
rounds once, to the params' dtype. So FedAvg through ``sgd(1.0)`` gives back the aggregated
parameters bitwise whenever that delta is exact, and within one ulp of the larger of the two
values otherwise, with one exception: an aggregated ``-0.0`` next to a global ``+0.0`` comes
back as ``+0.0`` (in IEEE 754, ``0 + (-0.0)`` is ``+0.0``), equal as a number, not in bits.

**Non-floating entries** (e.g. BatchNorm's ``num_batches_tracked``) take the aggregated value:
their delta is an int64 difference that every transform passes through unscaled, and no state
is kept for them.

Examples:
    >>> import torch
    >>> params = {"w": torch.tensor([1.0, 2.0])}
    >>> aggregated = {"w": torch.tensor([2.0, 0.0])}
    >>> opt = momentum(lr=1.0, beta=0.9)
    >>> state = opt.init(params)
    >>> params, state = server_step(opt, params, aggregated, state)
    >>> params
    {'w': tensor([2., 0.])}
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import attrs
import torch

from .._validators import finite_number
from ..tree import Params, floating_names

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdaptiveState",
    "Chain",
    "ChainState",
    "EmptyState",
    "Momentum",
    "MomentumState",
    "ServerTransform",
    "Yogi",
    "adagrad",
    "adam",
    "apply_updates",
    "chain",
    "momentum",
    "round_delta",
    "server_step",
    "sgd",
    "yogi",
]

S = TypeVar("S")

_F64 = torch.float64


class ServerTransform(Protocol[S]):
    """A server optimizer step as two pure functions (optax's ``GradientTransformation``)."""

    def init(self, params: Params) -> S:
        """The initial state for the global parameters ``params``."""
        ...

    def update(self, delta: Params, state: S, params: Params) -> tuple[dict[str, torch.Tensor], S]:
        """The update to add to ``params`` for the round's ``delta``, and the next state."""
        ...


def _check_names(what: str, a: Params, b: Params) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"{what} differ in names: {sorted(set(a) ^ set(b))}")


def _check_no_complex(tree: Params) -> None:
    for name, t in tree.items():
        if t.dtype.is_complex:
            raise TypeError(
                f"entry {name!r} is complex ({t.dtype}); only real dtypes are supported"
            )


def round_delta(aggregated: Params, params: Params) -> dict[str, torch.Tensor]:
    """The round's update ``aggregated - params``: float64 for floating entries, int64 others.

    Raises:
        ValueError: the trees differ in names or shapes.
        TypeError: an entry is complex.

    Examples:
        >>> import torch
        >>> round_delta({"w": torch.tensor([3.0]), "n": torch.tensor(5)},
        ...             {"w": torch.tensor([1.0]), "n": torch.tensor(2)})
        {'w': tensor([2.], dtype=torch.float64), 'n': tensor(3)}
    """
    _check_names("aggregated and params", aggregated, params)
    _check_no_complex(aggregated)
    _check_no_complex(params)
    out: dict[str, torch.Tensor] = {}
    for name, a in aggregated.items():
        p = params[name]
        if a.shape != p.shape:
            raise ValueError(
                f"entry {name!r}: aggregated has shape {tuple(a.shape)}, params {tuple(p.shape)}"
            )
        if a.dtype.is_floating_point or p.dtype.is_floating_point:
            out[name] = a.detach().to(_F64) - p.detach().to(_F64)
        else:
            out[name] = a.detach().to(torch.int64) - p.detach().to(torch.int64)
    return out


def apply_updates(params: Params, updates: Params) -> dict[str, torch.Tensor]:
    """``params + updates`` as a new tree in the params' dtypes (float64 sum, rounded once).

    Raises:
        ValueError: the trees differ in names or shapes.
        TypeError: a floating update for a non-floating entry, or a complex entry.

    Examples:
        >>> import torch
        >>> apply_updates({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])})
        {'w': tensor([1.5000])}
    """
    _check_names("params and updates", params, updates)
    _check_no_complex(params)
    _check_no_complex(updates)
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        u = updates[name]
        if u.shape != p.shape:
            raise ValueError(
                f"entry {name!r}: update has shape {tuple(u.shape)}, params {tuple(p.shape)}"
            )
        if p.dtype.is_floating_point:
            out[name] = (p.detach().to(_F64) + u.detach().to(_F64)).to(p.dtype)
        elif u.dtype.is_floating_point:
            raise TypeError(f"entry {name!r} is {p.dtype} but its update is {u.dtype}")
        else:
            out[name] = (p.detach().to(torch.int64) + u.detach().to(torch.int64)).to(p.dtype)
    return out


def server_step(
    transform: ServerTransform[S], params: Params, aggregated: Params, state: S
) -> tuple[dict[str, torch.Tensor], S]:
    """One server step: ``params + transform(aggregated - params)``; returns the new params
    and the transform's new state.

    Examples:
        >>> import torch
        >>> opt = sgd(0.5)
        >>> server_step(opt, {"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])},
        ...             opt.init({}))[0]
        {'w': tensor([2.])}
    """
    updates, new_state = transform.update(round_delta(aggregated, params), state, params)
    return apply_updates(params, updates), new_state


def _check_state(what: str, delta: Params, moments: Params) -> None:
    names = floating_names(delta)
    if set(names) != set(moments):
        raise ValueError(
            f"{what} state does not match the delta's floating entries: "
            f"{sorted(set(names) ^ set(moments))}"
        )
    for name in names:
        if delta[name].shape != moments[name].shape:
            raise ValueError(
                f"entry {name!r}: delta has shape {tuple(delta[name].shape)}, "
                f"{what} state {tuple(moments[name].shape)}"
            )


def _elementwise(
    delta: Params, fn: Callable[[str, torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``fn(name, float64 delta)`` cast back to the delta's dtype per floating entry; others
    are copied (passed through unscaled)."""
    return {
        name: fn(name, d.detach().to(_F64)).to(d.dtype)
        if d.dtype.is_floating_point
        else d.detach().clone()
        for name, d in delta.items()
    }


def _zeros(params: Params, fill: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        name: torch.full(params[name].shape, fill, dtype=_F64, device=params[name].device)
        for name in floating_names(params)
    }


def _check_unit(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and 0.0 <= float(value) < 1.0
    )
    if not ok:
        raise ValueError(f"{attribute.name} must be a number in [0, 1), got {value!r}")


_positive = finite_number(positive=True)


@attrs.frozen(eq=False)
class EmptyState:
    """The state of a stateless transform."""


@attrs.frozen
class SGD:
    """Server SGD: ``update = lr * delta``; see `sgd`."""

    lr: float = attrs.field(validator=_positive)

    def init(self, params: Params) -> EmptyState:
        """No state."""
        return EmptyState()

    def update(
        self, delta: Params, state: EmptyState, params: Params
    ) -> tuple[dict[str, torch.Tensor], EmptyState]:
        """``lr * delta`` (floating entries), the state unchanged."""
        lr = float(self.lr)
        return _elementwise(delta, lambda _name, d: d * lr), state


def sgd(lr: float) -> SGD:
    """Server SGD with learning rate ``lr``: ``params + lr * delta``; ``sgd(1.0)`` is FedAvg.

    Raises:
        ValueError: ``lr`` is not a finite number > 0.

    Examples:
        >>> import torch
        >>> sgd(0.5).update({"w": torch.tensor([2.0])}, EmptyState(), {"w": torch.zeros(1)})[0]
        {'w': tensor([1.])}
    """
    return SGD(lr)


@attrs.frozen(eq=False)
class MomentumState:
    """Heavy-ball velocity per floating entry (float64)."""

    velocity: Params


@attrs.frozen
class Momentum:
    """Server heavy-ball momentum (FedAvgM); see `momentum`."""

    lr: float = attrs.field(validator=_positive)
    beta: float = attrs.field(validator=_check_unit)

    def init(self, params: Params) -> MomentumState:
        """Zero velocity."""
        return MomentumState(velocity=_zeros(params))

    def update(
        self, delta: Params, state: MomentumState, params: Params
    ) -> tuple[dict[str, torch.Tensor], MomentumState]:
        """``v = beta * v + delta``; ``update = lr * v``."""
        _check_state("momentum", delta, state.velocity)
        lr, beta = float(self.lr), float(self.beta)
        velocity: dict[str, torch.Tensor] = {}

        def step(name: str, d: torch.Tensor) -> torch.Tensor:
            velocity[name] = state.velocity[name] * beta + d
            return velocity[name] * lr

        updates = _elementwise(delta, step)
        return updates, MomentumState(velocity=velocity)


def momentum(lr: float, beta: float = 0.9) -> Momentum:
    """FedAvgM (Hsu et al. 2019): ``v = beta * v + delta``; ``params += lr * v``.

    With ``beta = 0`` it is `sgd`. Velocity starts at zero and is kept in float64.

    Raises:
        ValueError: ``lr`` is not a finite number > 0, or ``beta`` not in ``[0, 1)``.

    Examples:
        >>> import torch
        >>> opt = momentum(lr=1.0, beta=0.5)
        >>> state = opt.init({"w": torch.zeros(1)})
        >>> for _ in range(2):
        ...     update, state = opt.update({"w": torch.tensor([2.0])}, state, {"w": torch.zeros(1)})
        >>> update
        {'w': tensor([3.])}
    """
    return Momentum(lr, beta)


@attrs.frozen(eq=False)
class AdaptiveState:
    """First and second moments per floating entry (float64), for `adam`, `yogi`, `adagrad`.

    Attributes:
        m: the first moment, starting at 0.
        v: the second moment, starting at ``tau ** 2``.
    """

    m: Params
    v: Params


def _adaptive_update(
    what: str,
    lr: float,
    b1: float,
    tau: float,
    second: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    delta: Params,
    state: AdaptiveState,
) -> tuple[dict[str, torch.Tensor], AdaptiveState]:
    """Algorithm 2 of Reddi et al.: ``m = b1 m + (1 - b1) d``; ``v = second(v, d^2)``;
    ``update = lr * m / (sqrt(v) + tau)``."""
    _check_state(what, delta, state.m)
    _check_state(what, delta, state.v)
    m_new: dict[str, torch.Tensor] = {}
    v_new: dict[str, torch.Tensor] = {}

    def step(name: str, d: torch.Tensor) -> torch.Tensor:
        m = state.m[name] * b1 + d * (1.0 - b1)
        v = second(state.v[name], d * d)
        m_new[name], v_new[name] = m, v
        return lr * m / (torch.sqrt(v) + tau)

    updates = _elementwise(delta, step)
    return updates, AdaptiveState(m=m_new, v=v_new)


@attrs.frozen
class Adam:
    """FedAdam's server step; see `adam`."""

    lr: float = attrs.field(validator=_positive)
    b1: float = attrs.field(default=0.9, validator=_check_unit)
    b2: float = attrs.field(default=0.99, validator=_check_unit)
    tau: float = attrs.field(default=1e-3, validator=_positive)

    def init(self, params: Params) -> AdaptiveState:
        """``m = 0``, ``v = tau ** 2``."""
        return AdaptiveState(m=_zeros(params), v=_zeros(params, float(self.tau) ** 2))

    def update(
        self, delta: Params, state: AdaptiveState, params: Params
    ) -> tuple[dict[str, torch.Tensor], AdaptiveState]:
        """``v = b2 v + (1 - b2) d^2``, then the shared adaptive step."""
        b2 = float(self.b2)
        return _adaptive_update(
            "adam",
            float(self.lr),
            float(self.b1),
            float(self.tau),
            lambda v, d2: v * b2 + d2 * (1.0 - b2),
            delta,
            state,
        )


@attrs.frozen
class Yogi:
    """FedYogi's server step; see `yogi`."""

    lr: float = attrs.field(validator=_positive)
    b1: float = attrs.field(default=0.9, validator=_check_unit)
    b2: float = attrs.field(default=0.99, validator=_check_unit)
    tau: float = attrs.field(default=1e-3, validator=_positive)

    def init(self, params: Params) -> AdaptiveState:
        """``m = 0``, ``v = tau ** 2``."""
        return AdaptiveState(m=_zeros(params), v=_zeros(params, float(self.tau) ** 2))

    def update(
        self, delta: Params, state: AdaptiveState, params: Params
    ) -> tuple[dict[str, torch.Tensor], AdaptiveState]:
        """``v = v - (1 - b2) d^2 sign(v - d^2)``, then the shared adaptive step."""
        b2 = float(self.b2)
        return _adaptive_update(
            "yogi",
            float(self.lr),
            float(self.b1),
            float(self.tau),
            lambda v, d2: v - d2 * (1.0 - b2) * torch.sign(v - d2),
            delta,
            state,
        )


@attrs.frozen
class Adagrad:
    """FedAdagrad's server step; see `adagrad`."""

    lr: float = attrs.field(validator=_positive)
    tau: float = attrs.field(default=1e-3, validator=_positive)
    b1: float = attrs.field(default=0.0, validator=_check_unit)

    def init(self, params: Params) -> AdaptiveState:
        """``m = 0``, ``v = tau ** 2``."""
        return AdaptiveState(m=_zeros(params), v=_zeros(params, float(self.tau) ** 2))

    def update(
        self, delta: Params, state: AdaptiveState, params: Params
    ) -> tuple[dict[str, torch.Tensor], AdaptiveState]:
        """``v = v + d^2``, then the shared adaptive step."""
        return _adaptive_update(
            "adagrad",
            float(self.lr),
            float(self.b1),
            float(self.tau),
            lambda v, d2: v + d2,
            delta,
            state,
        )


def adam(lr: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> Adam:
    """FedAdam: ``v = b2 * v + (1 - b2) * d ** 2``.

    Exactly Algorithm 2 of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), with
    ``d = delta``: ``m = b1 * m + (1 - b1) * d``; ``params += lr * m / (sqrt(v) + tau)``.
    No bias correction. The paper asks for ``v_{-1} >= tau ** 2``; we start at ``v = tau ** 2``
    and ``m = 0``. Moments are float64. Defaults are the paper's ``b1``, ``b2`` and ``tau``.

    Raises:
        ValueError: ``lr`` or ``tau`` is not a finite number > 0, or ``b1``/``b2`` not in
            ``[0, 1)``.

    Examples:
        >>> import torch
        >>> opt = adam(lr=0.1, tau=1.0)
        >>> delta, params = {"w": torch.tensor([2.0])}, {"w": torch.zeros(1)}
        >>> update, state = opt.update(delta, opt.init(params), params)
        >>> update["w"], state.v["w"]
        (tensor([0.0099]), tensor([1.0300], dtype=torch.float64))
    """
    return Adam(lr, b1, b2, tau)


def yogi(lr: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> Yogi:
    """FedYogi: ``v = v - (1 - b2) * d ** 2 * sign(v - d ** 2)``.

    Exactly Algorithm 2 of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), with
    ``d = delta``: ``m = b1 * m + (1 - b1) * d``; ``params += lr * m / (sqrt(v) + tau)``.
    No bias correction; ``sign(0) = 0``. The paper asks for ``v_{-1} >= tau ** 2``; we start at
    ``v = tau ** 2`` and ``m = 0``. Moments are float64.

    Raises:
        ValueError: ``lr`` or ``tau`` is not a finite number > 0, or ``b1``/``b2`` not in
            ``[0, 1)``.

    Examples:
        >>> import torch
        >>> opt = yogi(lr=0.1, tau=1.0)
        >>> delta, params = {"w": torch.tensor([2.0])}, {"w": torch.zeros(1)}
        >>> update, state = opt.update(delta, opt.init(params), params)
        >>> update["w"], state.v["w"]
        (tensor([0.0099]), tensor([1.0400], dtype=torch.float64))
    """
    return Yogi(lr, b1, b2, tau)


def adagrad(lr: float, tau: float = 1e-3, b1: float = 0.0) -> Adagrad:
    """FedAdagrad: ``v = v + d ** 2``.

    Exactly Algorithm 2 of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), with
    ``d = delta``: ``m = b1 * m + (1 - b1) * d``; ``params += lr * m / (sqrt(v) + tau)``.
    Algorithm 2 applies the first moment with ``b1`` to all three variants; plain Adagrad has
    no momentum, so our default is ``b1 = 0`` (``m = delta``; pass e.g. ``b1=0.9`` for the
    momentum form). The paper asks for ``v_{-1} >= tau ** 2``; we start at ``v = tau ** 2`` and
    ``m = 0``. Moments are float64.

    Raises:
        ValueError: ``lr`` or ``tau`` is not a finite number > 0, or ``b1`` not in ``[0, 1)``.

    Examples:
        >>> import torch
        >>> opt = adagrad(lr=0.1, tau=1.0)
        >>> delta, params = {"w": torch.tensor([2.0])}, {"w": torch.zeros(1)}
        >>> update, state = opt.update(delta, opt.init(params), params)
        >>> update["w"], state.v["w"]
        (tensor([0.0618]), tensor([5.], dtype=torch.float64))
    """
    return Adagrad(lr, tau, b1)


@attrs.frozen(eq=False)
class ChainState:
    """The states of a `Chain`'s transforms, in order."""

    states: tuple[Any, ...]


def _as_transforms(value: object) -> tuple[ServerTransform[Any], ...]:
    if not isinstance(value, tuple):
        raise TypeError(f"transforms must be a tuple, got {value!r}")
    items = cast(tuple[object, ...], value)
    for i, t in enumerate(items):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(f"transforms[{i}] is not a ServerTransform (init/update): {t!r}")
    return cast(tuple[ServerTransform[Any], ...], items)


@attrs.frozen
class Chain:
    """Transforms applied in order, each to the previous one's update; see `chain`."""

    transforms: tuple[ServerTransform[Any], ...] = attrs.field(converter=_as_transforms)

    def init(self, params: Params) -> ChainState:
        """Each transform's initial state."""
        return ChainState(states=tuple(t.init(params) for t in self.transforms))

    def update(
        self, delta: Params, state: ChainState, params: Params
    ) -> tuple[dict[str, torch.Tensor], ChainState]:
        """Fold ``delta`` through the transforms, collecting their new states."""
        if len(state.states) != len(self.transforms):
            raise ValueError(
                f"chain of {len(self.transforms)} transforms got {len(state.states)} states"
            )
        updates: dict[str, torch.Tensor] = dict(delta)
        new_states: list[Any] = []
        for transform, inner in zip(self.transforms, state.states, strict=True):
            updates, new_inner = transform.update(updates, inner, params)
            new_states.append(new_inner)
        return updates, ChainState(states=tuple(new_states))


def chain(*transforms: ServerTransform[Any]) -> Chain:
    """Compose transforms left to right; the state is a `ChainState` of theirs, in order.

    Raises:
        TypeError: an argument has no ``init``/``update``.

    Examples:
        >>> import torch
        >>> opt = chain(sgd(0.5), momentum(lr=2.0, beta=0.0))
        >>> opt.update({"w": torch.tensor([3.0])}, opt.init({"w": torch.zeros(1)}), {})[0]
        {'w': tensor([3.])}
    """
    return Chain(transforms)
