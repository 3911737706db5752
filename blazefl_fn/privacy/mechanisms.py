"""Differential privacy's arithmetic: the noise records and the noised stages (re-exported by
`blazefl_fn.privacy`, which also holds the accountant and `privatize`).

Every draw comes from a key: the central noise from the round's server key (`run_round` hands
it to a keyed aggregate), local noise from the client's key, so a private run is as
reproducible as any other. Noise is drawn by numpy's Philox keyed by all 128 bits of the key
(`Key.numpy_generator`), in float64, entry by entry in name order, and then moved to the
entry's device: the same bits whichever device holds the model. It is a floating-point sampler,
as a simulator needs; a deployment would want a secure one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import attrs
import numpy as np
import torch

from .._validators import finite_number, noise_multiplier, plus_zero
from ..executors.jobs import ClientUpdate, VectorizedUpdate
from ..keys import Key
from ..records import ClientTask, Downlink, Uplink
from ..server.aggregators import clip_by_norm, global_norm
from ..server.optim import apply_updates, round_delta
from ..tree import Params, floating_names, nonfinite

__all__ = [
    "AdaptiveClipping",
    "CentralDP",
    "DPState",
    "LocalDP",
    "LocalNoiseUpdate",
    "VectorizedLocalNoiseUpdate",
    "gaussian_like",
    "private_mean_delta",
]

# Covariant (a frozen record): a ``DPState[MomentumState]`` is a ``DPState[object]``.
S = TypeVar("S", covariant=True)
Data = TypeVar("Data")

_F64 = torch.float64
_MAX_NORM = 1e12


@attrs.frozen
class AdaptiveClipping:
    """Adaptive clipping (Andrew et al. 2021): the clip norm tracks a quantile of the norms.

    Each round the server counts the clients whose update was within the clip norm ``C``,
    noises the count (standard deviation ``count_noise``), and moves ``C`` geometrically
    towards the ``quantile`` of the update norms: ``C <- C * exp(-lr * (b - quantile))``, where
    ``b`` is the noised fraction within ``C``.

    Attributes:
        quantile: the target fraction of clients whose update is not clipped, in [0, 1].
        lr: the geometric learning rate of the clip norm (the paper's eta_C), > 0.
        count_noise: the standard deviation of the noise on the count (the paper's sigma_b);
            None takes the paper's choice, the expected clients per round / 20. Part of the
            privacy budget: the update's noise is raised so that the two together spend what
            ``noise_multiplier`` alone would.
    """

    quantile: float = attrs.field(
        default=0.5, converter=plus_zero, validator=finite_number(positive=False, high=1.0)
    )
    lr: float = attrs.field(default=0.2, validator=finite_number(positive=True, high=100.0))
    count_noise: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, high=1e9))
    )

    def sigma(self, expected_clients: float) -> float:
        """The count's noise standard deviation for ``expected_clients`` per round."""
        return self.count_noise if self.count_noise is not None else expected_clients / 20.0


@attrs.frozen
class CentralDP:
    """Central DP (DP-FedAvg, McMahan et al. 2018): the server clips, sums, noises, averages.

    Each client's update (its parameters minus the global ones) is clipped to L2 norm
    ``clip_norm``; Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` is
    added to the *sum* of the clipped updates, once per round, from the round's server key;
    the sum is divided by the expected number of clients per round (a fixed denominator, so
    that one client's contribution is bounded whatever the others sent). Every sampled client
    counts once, whatever its number of examples.

    Attributes:
        clip_norm: the clip norm ``C`` (the initial one with ``adaptive``), > 0.
        noise_multiplier: ``z``, >= 0; the accountant's noise multiplier.
        adaptive: track a quantile of the update norms instead of a fixed ``C``.
    """

    clip_norm: float = attrs.field(validator=finite_number(positive=True, high=_MAX_NORM))
    noise_multiplier: float = attrs.field(converter=plus_zero, validator=noise_multiplier())
    adaptive: AdaptiveClipping | None = None

    def update_noise_multiplier(self, expected_clients: float) -> float:
        """The multiplier of the update's own noise, ``z_delta``.

        With adaptive clipping, the count's noise spends part of the budget; Andrew et al.
        (2021, Thm. 1) give ``z_delta = (z**-2 - (2 * sigma_b)**-2) ** -0.5``.

        Raises:
            ValueError: the count's noise alone would spend more than ``noise_multiplier``
                allows (``2 * sigma_b <= z``).
        """
        z = self.noise_multiplier
        if self.adaptive is None or z == 0.0:
            return z
        sigma_b = self.adaptive.sigma(expected_clients)
        if 2.0 * sigma_b <= z:
            raise ValueError(
                f"adaptive clipping's count noise sigma_b={sigma_b:g} leaves no budget for the "
                f"update at noise_multiplier={z:g}: it needs 2*sigma_b > z (raise count_noise "
                "or the expected clients per round)"
            )
        return (z**-2 - (2.0 * sigma_b) ** -2) ** -0.5


@attrs.frozen
class LocalDP:
    """Local DP: each client clips its update to ``clip_norm`` and adds Gaussian noise of
    standard deviation ``noise_multiplier * clip_norm`` from its own key before sending it."""

    clip_norm: float = attrs.field(validator=finite_number(positive=True, high=_MAX_NORM))
    noise_multiplier: float = attrs.field(converter=plus_zero, validator=noise_multiplier())


@attrs.frozen
class DPState(Generic[S]):
    """``ServerState.aux`` of a central-DP algorithm: the server optimizer's state and the
    current clip norm (it moves under adaptive clipping, so checkpoints keep it).

    Generic in ``server``, the aux of the algorithm `blazefl_fn.privacy.privatize.privatize`
    wrapped:
    ``privatize(fedavg(...), CentralDP(...))`` holds a ``DPState[Mapping[str, Tensor]]`` (an
    empty dict), ``privatize(fedavgm(...), CentralDP(...))`` a ``DPState[MomentumState]``.

    Attributes:
        server: the wrapped algorithm's own aux (its server optimizer's state).
        clip_norm: the current clip norm ``C``.
    """

    server: S
    clip_norm: float


def gaussian_like(tree: Params, names: Sequence[str], std: float, key: Key) -> dict[str, Any]:
    """Standard-normal noise times ``std`` for the entries ``names`` of ``tree``, in float64.

    Drawn on the CPU by ``key.numpy_generator()`` (Philox over all 128 bits), in sorted name
    order, then moved to each entry's device.
    """
    generator = key.numpy_generator()
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        t = tree[name]
        draw = torch.as_tensor(generator.standard_normal(tuple(t.shape), dtype=np.float64))
        out[name] = (draw * std).to(t.device)
    return out


def private_mean_delta(
    current: Params,
    trees: Sequence[Params],
    dp: CentralDP,
    clip_norm: float,
    expected_clients: float,
    key: Key,
) -> tuple[dict[str, torch.Tensor], float]:
    """DP-FedAvg's noised mean update and the next round's clip norm.

    ``(sum_k clip(trees[k] - current) + N(0, (z_delta * C)^2)) / expected_clients`` in
    float64 (non-floating entries: zero), summed in the given (client-id) order, with the
    noise from ``key.fold_in("update")``; the clip norm moves only under adaptive clipping,
    with the count's noise from ``key.fold_in("quantile")``.
    """
    names = floating_names(current)
    total = {
        name: torch.zeros(tuple(t.shape), dtype=_F64 if name in names else torch.int64).to(t.device)
        for name, t in current.items()
    }
    within = 0
    for tree in trees:
        delta = round_delta(tree, current)
        if global_norm(delta) <= clip_norm:
            within += 1
        clipped = clip_by_norm(delta, clip_norm)
        for name in names:
            total[name] = total[name] + clipped[name]
    std = dp.update_noise_multiplier(expected_clients) * clip_norm
    noise = gaussian_like(current, names, std, key.fold_in("update"))
    mean = {
        name: (total[name] + noise[name]) / expected_clients if name in noise else total[name]
        for name in current
    }
    next_clip = clip_norm
    if dp.adaptive is not None:
        sigma_b = dp.adaptive.sigma(expected_clients)
        drawn = float(key.fold_in("quantile").numpy_generator().standard_normal())
        # The count of b_k - 1/2 has sensitivity 1/2 (Andrew et al.): that is what sigma_b
        # is calibrated against. Poisson sampling can send more than the expected clients:
        # the estimate is clamped to a fraction, as TF Privacy's quantile query does.
        fraction = (within - len(trees) / 2 + drawn * sigma_b) / expected_clients + 0.5
        fraction = min(max(fraction, 0.0), 1.0)
        next_clip = clip_norm * math.exp(-dp.adaptive.lr * (fraction - dp.adaptive.quantile))
        next_clip = min(max(next_clip, 1e-12), _MAX_NORM)
    return mean, next_clip


@attrs.frozen
class LocalNoiseUpdate(Generic[Data]):
    """A client update followed by local DP: the uplink's trainable entries are replaced by
    ``downlink + clip(trained - downlink) + N(0, (z * C)^2)``, noise from the client's key.

    Nothing else about the client's data leaves it: the uplink says ``num_examples=1`` (the
    server takes an unweighted mean), no metrics and no step count. An update holding a NaN or
    an infinity is sent as all NaN (nothing of it leaks), for `Algorithm.nonfinite` to fail or
    skip that client.

    Attributes:
        inner: the client update to privatise.
        dp: the clip norm and noise multiplier.
        names: the entries to privatise (the trainable parameters); the others pass as sent.
    """

    inner: ClientUpdate[Data]
    dp: LocalDP
    names: tuple[str, ...]

    def __call__(self, downlink: Downlink, data: Data, task: ClientTask) -> Uplink:
        """Run ``inner``, then clip and noise its update."""
        return self.privatise(downlink, self.inner(downlink, data, task), task.key)

    def privatise(self, downlink: Downlink, uplink: Uplink, key: Key) -> Uplink:
        """``uplink`` with its update clipped and noised from ``key.fold_in("dp")``."""
        sent = uplink.params
        base = {name: downlink.params[name] for name in self.names}
        delta = round_delta({name: sent[name] for name in self.names}, base)
        blank = attrs.evolve(uplink, num_examples=1, metrics={}, steps=0)
        if nonfinite(delta):
            nan = {name: torch.full_like(t, math.nan) for name, t in base.items()}
            return attrs.evolve(blank, params={**sent, **nan})
        clipped = clip_by_norm(delta, self.dp.clip_norm)
        std = self.dp.noise_multiplier * self.dp.clip_norm
        noise = gaussian_like(base, floating_names(base), std, key.fold_in("dp"))
        noised = {
            name: clipped[name] + noise[name].to(clipped[name].device)
            if name in noise
            else delta[name]
            for name in clipped
        }
        return attrs.evolve(blank, params={**sent, **apply_updates(base, noised)})


@attrs.frozen
class VectorizedLocalNoiseUpdate(LocalNoiseUpdate[Data]):
    """`LocalNoiseUpdate` over a vectorisable update: chunks train together, then each client
    is noised from its own key (the same bits as one at a time, up to the inner update's)."""

    def update_chunk(
        self, downlink: Downlink, data: Sequence[Data], tasks: Sequence[ClientTask]
    ) -> list[Uplink]:
        """The inner update's chunk, each uplink privatised."""
        inner: VectorizedUpdate[Data] = self.inner  # pyright: ignore[reportAssignmentType]
        trained = inner.update_chunk(downlink, data, tasks)
        return [self.privatise(downlink, u, t.key) for u, t in zip(trained, tasks, strict=True)]

    def client_bytes(self, downlink: Downlink, data: Data) -> int:
        """The inner update's estimate."""
        inner: VectorizedUpdate[Data] = self.inner  # pyright: ignore[reportAssignmentType]
        return inner.client_bytes(downlink, data)
