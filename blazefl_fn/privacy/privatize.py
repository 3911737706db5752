"""Client-level differential privacy: DP-FedAvg as stages, and an accountant with a budget.

`privatize` turns an algorithm of the FedAvg family (`blazefl_fn.algorithms.fedavg` and every
algorithm `blazefl_fn.algorithms.compose` builds) into a private one:

- **central** (`CentralDP`, McMahan et al. 2018): the server clips each client's update to
  ``C``, adds Gaussian noise of standard deviation ``z * C`` to the sum once per round, drawn
  from the round's server key, and divides by the expected clients per round; with
  `AdaptiveClipping` ``C`` follows a quantile of the update norms (Andrew et al. 2021);
- **local** (`LocalDP`): each client clips its update and adds its own noise from its key.

Privacy is client-level: neighbouring federations differ in one client's whole data.
`Accountant` computes the epsilon spent after ``T`` rounds with Opacus's accountants for the
sampled Gaussian mechanism (RDP, or PRV: tighter, slower), installed by the optional extra
``blazefl_fn[privacy]`` and imported only when an epsilon is asked for.

**Sampling.** The accountants assume Poisson sampling: every client takes part independently
with rate ``q``. `privatize` uses it by default (`blazefl_fn.server.sampling.PoissonSampler`, rate
``clients_per_round / num_clients``). Fixed-size sampling (exactly ``clients_per_round``
without replacement) is allowed with ``poisson=False``; the accountant then still charges the
sampled Gaussian at ``q = clients_per_round / num_clients``, which is the usual approximation,
not a proof for that sampler.

**Local DP's epsilon** is that of the Gaussian mechanism composed over every round (``q = 1``):
the server sees who sent what, so sampling amplifies nothing, and a client sampled in every
round is the worst case. Any two datasets of one client are neighbours (the server knows who
sent), so a clipped update's sensitivity is ``2C`` and the accountant is charged the
multiplier ``z / 2``. It bounds every client.

**What the guarantee covers.** The sequence of global models (central) or of noised uplinks
(local), with the run's seed kept secret: the seed regenerates every noise draw. It does not
cover what a simulation reports about itself: the sampled client ids, the clients' training
metrics and example counts in `RoundReport`, the metrics log and ``--json`` (under central
DP), and the checkpoint's config, which holds the seed.

**The accountant's state.** ``z`` and ``q`` are fixed for a run (a resumed run may not change
them), so the accountant's history is the number of rounds completed, which every
checkpoint holds; with adaptive clipping the checkpoint also holds the current clip norm
(`DPState`). A resumed run therefore reports the same epsilon as an uninterrupted one with
the same accountant and delta (both may change on resume: they only account).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar, cast, overload

import attrs

from .._validators import MIN_NOISE_MULTIPLIER, finite_number, noise_multiplier, one_of, plus_zero
from ..algorithms.compose import Aggregate
from ..executors.jobs import VectorizedUpdate
from ..keys import Key
from ..records import ServerState, Uplink
from ..round import Algorithm
from ..server.aggregators import mean
from ..server.optim import apply_updates
from ..server.sampling import poisson_sampler, uniform_sampler
from ..tree import select
from .mechanisms import (
    CentralDP,
    DPState,
    LocalDP,
    LocalNoiseUpdate,
    VectorizedLocalNoiseUpdate,
    private_mean_delta,
)

__all__ = [
    "ACCOUNTANTS",
    "PRV_MAX_POINTS",
    "Accountant",
    "PrivacyBudget",
    "PrivateAggregate",
    "PrivateInit",
    "check_accountant",
    "privatize",
    "prv_points",
]

Data = TypeVar("Data")
A = TypeVar("A")

ACCOUNTANTS = ("rdp", "prv")
"""The accountants `Accountant` offers: Opacus's ``RDPAccountant`` and ``PRVAccountant``."""


def _opacus() -> tuple[Any, Any]:
    """Opacus's accountants module and its RDP analysis."""
    try:
        from opacus import accountants  # pyright: ignore[reportMissingTypeStubs]
        from opacus.accountants.analysis import rdp  # pyright: ignore[reportMissingTypeStubs]
    except ImportError as exc:
        raise ImportError(
            "privacy accounting needs Opacus: pip install 'blazefl_fn[privacy]'"
        ) from exc
    return accountants, rdp


@functools.lru_cache(maxsize=256)
def _rdp_per_round(noise_multiplier: float, rate: float) -> Any:
    """One round's RDP at Opacus's default orders (RDP composes by adding: T rounds cost T
    times this)."""
    accountants, rdp = _opacus()
    return rdp.compute_rdp(
        q=rate, noise_multiplier=noise_multiplier, steps=1,
        orders=accountants.RDPAccountant.DEFAULT_ALPHAS,
    )  # fmt: skip


def _opacus_epsilon(
    method: str, noise_multiplier: float, rate: float, steps: int, delta: float
) -> float:
    accountants, rdp = _opacus()
    with warnings.catch_warnings():
        # Opacus warns when the best Renyi order is at the end of its grid (a loose but
        # valid bound), and numpy when PRV meets q = 1; neither changes the answer's validity.
        warnings.simplefilter("ignore")
        if method == "rdp":
            # What RDPAccountant.get_epsilon computes, bit for bit (its compute_rdp returns
            # the one-step RDP times steps), without recomputing the one-step RDP every round:
            # 0.1 ms a round instead of 0.1-0.2 s.
            epsilon, _ = rdp.get_privacy_spent(
                orders=accountants.RDPAccountant.DEFAULT_ALPHAS,
                rdp=_rdp_per_round(noise_multiplier, rate) * steps,
                delta=delta,
            )
            return float(epsilon)
        accountant = accountants.PRVAccountant()
        accountant.history = [(noise_multiplier, rate, steps)]
        return float(accountant.get_epsilon(delta=delta))


# Opacus's PRV accountant discretizes the privacy loss on a grid of points, about 180 bytes
# each at its peak (measured: 20.8M points took 3.7 GB); small noise over many rounds needs
# hundreds of millions (z=0.03, q=0.1, 100 rounds: 380M points, killed at 24 GB).
PRV_MAX_POINTS = 1 << 23
"""The largest grid `check_accountant` lets the PRV accountant build (about 1.5 GB)."""


def prv_points(noise_multiplier: float, rate: float, steps: int, delta: float) -> int:
    """How many points Opacus's PRV accountant discretizes ``steps`` rounds on.

    Its own computation (``PRVAccountant.get_epsilon`` with its default errors: the safe
    domain of Gopi et al. and the mesh for ``steps`` compositions), without the grid itself.
    """
    _opacus()
    from opacus.accountants.analysis.prv import (  # pyright: ignore[reportMissingTypeStubs]
        PoissonSubsampledGaussianPRV,  # pyright: ignore[reportUnknownVariableType]
        compute_safe_domain_size,  # pyright: ignore[reportUnknownVariableType]
    )

    eps_error, delta_error = 0.01, delta / 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half_width = float(
            compute_safe_domain_size(
                [PoissonSubsampledGaussianPRV(rate, noise_multiplier)],
                [steps],
                eps_error=eps_error,
                delta_error=delta_error,
            )
        )
    mesh = eps_error / math.sqrt(steps * math.log(12 / delta_error) / 2)
    return math.ceil(2 * half_width / mesh) + 1


def check_accountant(
    method: str, noise_multiplier: float, rate: float, steps: int, delta: float
) -> None:
    """Refuse an accounting the accountant cannot do in bounded memory.

    Raises:
        ValueError: the PRV accountant would need more than `PRV_MAX_POINTS` grid points
            (gigabytes of memory) for ``steps`` rounds.
        ImportError: Opacus is not installed.
    """
    if method != "prv" or steps == 0 or noise_multiplier == 0.0:
        return
    points = prv_points(noise_multiplier, rate, steps, delta)
    if points > PRV_MAX_POINTS:
        raise ValueError(
            f"the prv accountant would discretize {steps} rounds at z={noise_multiplier:g}, "
            f"q={rate:g} on {points:,} points (about {points * 180 / 2**30:.0f} GiB; at most "
            f"{PRV_MAX_POINTS:,}); use the rdp accountant, more noise or fewer rounds"
        )


@functools.lru_cache(maxsize=4096)
def _epsilon(method: str, noise_multiplier: float, rate: float, steps: int, delta: float) -> float:
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    check_accountant(method, noise_multiplier, rate, steps, delta)
    try:
        return _opacus_epsilon(method, noise_multiplier, rate, steps, delta)
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise ValueError(
            f"the {method} accountant cannot bound z={noise_multiplier:g}, q={rate:g} over "
            f"{steps} rounds at delta={delta:g}: {exc}"
        ) from exc


@attrs.frozen
class Accountant:
    """The client-level (epsilon, delta) a run has spent after some rounds.

    Attributes:
        noise_multiplier: ``z`` of the Gaussian mechanism each round (>= 0; 0 spends
            infinite epsilon).
        sample_rate: the probability ``q`` that a client takes part in a round, in (0, 1].
        delta: the delta of the guarantee, in (0, 1).
        method: ``"rdp"`` or ``"prv"`` (`ACCOUNTANTS`).

    Examples:
        >>> acc = Accountant(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5)
        >>> acc.epsilon(0), round(acc.epsilon(100), 2)
        (0.0, 7.9)
    """

    # Down to half the mechanisms' floor: local DP is charged at z / 2.
    noise_multiplier: float = attrs.field(
        converter=plus_zero, validator=noise_multiplier(MIN_NOISE_MULTIPLIER / 2)
    )
    sample_rate: float = attrs.field(validator=finite_number(positive=True, high=1.0))
    delta: float = attrs.field(validator=finite_number(positive=True, below=1.0))
    method: str = attrs.field(default="rdp", validator=one_of(ACCOUNTANTS))

    @classmethod
    def for_dp(
        cls, dp: CentralDP | LocalDP, sample_rate: float, delta: float, method: str = "rdp"
    ) -> Accountant:
        """The accountant of ``dp`` under sampling rate ``sample_rate`` (local DP: ``q = 1`` and
        ``z / 2``, see the module's docs)."""
        if isinstance(dp, CentralDP):
            return cls(float(dp.noise_multiplier), float(sample_rate), delta, method)
        # Local: any two datasets of one client are neighbours, so the clipped update's
        # sensitivity is 2C: the multiplier relative to it is z / 2.
        return cls(dp.noise_multiplier / 2, 1.0, delta, method)

    def epsilon(self, rounds: int) -> float:
        """The epsilon spent after ``rounds`` rounds (0 for none).

        Raises:
            ValueError: ``rounds`` is negative, or the accountant cannot bound it.
            ImportError: Opacus is not installed (``pip install 'blazefl_fn[privacy]'``).
        """
        count = cast(object, rounds)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        return _epsilon(self.method, self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def spent(self, state: ServerState) -> dict[str, float]:
        """``{"epsilon": ..., "delta": ...}`` after the rounds ``state`` has completed."""
        return {"epsilon": self.epsilon(state.round), "delta": self.delta}


@attrs.frozen
class PrivacyBudget:
    """Stop a run before the round that would spend more than ``target_epsilon``.

    Examples:
        >>> budget = PrivacyBudget(Accountant(1.0, 0.1, 1e-5), target_epsilon=3.0)
        >>> budget.stop_before(ServerState(params={}, round=0)) is None
        True
        >>> print(budget.stop_before(ServerState(params={}, round=5)))  # doctest: +ELLIPSIS
        stopped before round 6: it would spend epsilon=3.03 > the target 3 (delta=1e-05); ...
    """

    accountant: Accountant
    target_epsilon: float = attrs.field(validator=finite_number(positive=True, high=1e6))

    def stop_before(self, state: ServerState) -> str | None:
        """Why the round after ``state`` must not run, or None if the budget allows it."""
        after = self.accountant.epsilon(state.round + 1)
        if after <= self.target_epsilon:
            return None
        spent = self.accountant.epsilon(state.round)
        return (
            f"stopped before round {state.round + 1}: it would spend epsilon={after:.3g} > the "
            f"target {self.target_epsilon:g} (delta={self.accountant.delta:g}); the "
            f"{state.round} completed rounds spent epsilon={spent:.3g}"
        )


@attrs.frozen
class PrivateInit(Generic[A]):
    """Central DP's ``init`` stage: the algorithm's own initial state, its aux in a `DPState`.

    Attributes:
        inner: the algorithm's ``init``.
        dp: the mechanism (its initial clip norm starts the `DPState`).
    """

    inner: Callable[[Key], ServerState[A]]
    dp: CentralDP

    def __call__(self, key: Key) -> ServerState[DPState[A]]:
        state = self.inner(key)
        return ServerState(
            params=state.params,
            round=state.round,
            aux=DPState(server=state.aux, clip_norm=self.dp.clip_norm),
        )


@attrs.frozen
class PrivateAggregate(Generic[A]):
    """Central DP's aggregate stage (DP-FedAvg, McMahan et al. 2018) around an `Aggregate`.

    Each client's delta is clipped to the current clip norm, the sum is noised from the
    round's server key (`blazefl_fn.privacy.mechanisms.private_mean_delta`) and divided by
    ``expected_clients``, unweighted; then ``aggregate``'s server transform (if any) steps.
    The state's aux is a `DPState` holding the transform's state and the clip norm. A
    `blazefl_fn.round.KeyedAggregate`: `blazefl_fn.round.run_round` calls `with_key`.

    Attributes:
        aggregate: the algorithm's own stage: the mean aggregator, no clipping of its own.
        dp: the mechanism.
        expected_clients: the fixed denominator of the private mean (the sampler's expected
            clients per round, > 0).

    Raises:
        ValueError: ``aggregate`` clips or aggregates other than by the mean, or
            ``expected_clients`` is not a positive number.
    """

    aggregate: Aggregate[A]
    dp: CentralDP
    expected_clients: float

    def __attrs_post_init__(self) -> None:
        if self.aggregate.aggregator is not mean or self.aggregate.clip_norm is not None:
            raise ValueError(
                "central DP averages clipped updates itself: it needs the mean aggregator and "
                f"no clip_norm of the aggregate (got {self.aggregate.aggregator!r}, "
                f"clip_norm={self.aggregate.clip_norm!r})"
            )
        expected = self.expected_clients
        if not (math.isfinite(expected) and expected > 0):
            raise ValueError(
                f"central DP needs the expected clients per round (> 0), got {expected!r}"
            )

    def __call__(
        self, state: ServerState[DPState[A]], uplinks: Sequence[Uplink]
    ) -> ServerState[DPState[A]]:
        """Refused: the noise needs the round's key."""
        raise TypeError(
            "a central-DP aggregate draws noise: call with_key(state, uplinks, key) "
            "(run_round does)"
        )

    def with_key(
        self, state: ServerState[DPState[A]], uplinks: Sequence[Uplink], key: Key
    ) -> ServerState[DPState[A]]:
        """The next state; ``key`` draws the noise."""
        aux = cast(object, state.aux)
        if not isinstance(aux, DPState):
            raise TypeError(f"a central-DP aggregate needs a DPState aux, got {type(aux).__name__}")
        dp_state = cast(DPState[A], aux)
        names = self.aggregate.stepped_names()
        current = state.params if names is None else select(state.params, names)
        trees = [u.params if names is None else select(u.params, names) for u in uplinks]
        delta, next_clip = private_mean_delta(
            current, trees, self.dp, dp_state.clip_norm, self.expected_clients, key
        )
        server_aux = dp_state.server
        server = self.aggregate.server
        if server is None:
            stepped = apply_updates(current, delta)
        else:
            update, server_aux = server.update(delta, server_aux, current)
            stepped = apply_updates(current, update)
        params = {name: stepped.get(name, t) for name, t in state.params.items()}
        return ServerState(params=params, round=state.round + 1, aux=DPState(server_aux, next_clip))


def _full_names(algorithm: Algorithm[Any, Any]) -> tuple[str, ...]:
    return tuple(algorithm.init(Key.from_seed(0)).params)


@overload
def privatize(
    algorithm: Algorithm[Data, A],
    dp: CentralDP,
    *,
    num_clients: int,
    clients_per_round: int,
    sampling: Literal["poisson", "fixed"] = "poisson",
) -> Algorithm[Data, DPState[A]]: ...
@overload
def privatize(
    algorithm: Algorithm[Data, A],
    dp: LocalDP,
    *,
    num_clients: int,
    clients_per_round: int,
    sampling: Literal["poisson", "fixed"] = "poisson",
) -> Algorithm[Data, A]: ...
def privatize(
    algorithm: Algorithm[Data, Any],
    dp: CentralDP | LocalDP,
    *,
    num_clients: int,
    clients_per_round: int,
    sampling: Literal["poisson", "fixed"] = "poisson",
) -> Algorithm[Data, Any]:
    """``algorithm`` with client-level DP: central (the server noises) or local (clients do).

    Args:
        algorithm: of the FedAvg family: `blazefl_fn.algorithms.fedavg`, `fedprox`,
            `fedavgm`, ... or any built by `blazefl_fn.algorithms.compose` (its aggregate stage
            is an `Aggregate`); for central DP with the mean aggregator and no ``clip_norm``
            of its own, not central-private already, and buffers (BatchNorm statistics) only
            under ``Aggregate(buffers="with_params")``; for local DP, a model without buffers.
            Its sampler is replaced by the one ``sampling`` names.
        dp: `CentralDP` or `LocalDP`.
        num_clients: clients in the federation.
        clients_per_round: the expected clients per round: Poisson sampling at rate
            ``clients_per_round / num_clients``, or exactly this many with ``"fixed"``.
        sampling: ``"poisson"`` (what the accountants assume) or ``"fixed"``.

    Returns:
        The private algorithm. Under `CentralDP` its states' ``aux`` is a `DPState` holding
        ``algorithm``'s aux (``DPState.server``) and the clip norm: ``privatize(fedavg(...),
        CentralDP(...))`` is an ``Algorithm[ClientData, DPState[Mapping[str, Tensor]]]``.
        Under `LocalDP` the server is unchanged and so is the aux type.

    Raises:
        ValueError: an algorithm or model the chosen DP cannot privatise, or bad counts.
        TypeError: ``dp`` is not a `CentralDP` or `LocalDP`.

    Examples:
        >>> import functools
        >>> from blazefl_fn.algorithms import fedavg
        >>> from blazefl_fn.client.training import LocalSGD
        >>> from blazefl_fn.models import logistic_regression
        >>> algo = fedavg(functools.partial(logistic_regression, (60,), 10),
        ...               num_clients=100, clients_per_round=10, local=LocalSGD())
        >>> private = privatize(algo, CentralDP(clip_norm=1.0, noise_multiplier=1.0),
        ...                     num_clients=100, clients_per_round=10)
        >>> private.init(Key.from_seed(0)).aux
        DPState(server={}, clip_norm=1.0)
    """
    if not isinstance(cast(object, dp), CentralDP | LocalDP):
        raise TypeError(f"dp must be a CentralDP or a LocalDP, got {type(dp).__name__}")
    aggregate = algorithm.aggregate
    if isinstance(aggregate, PrivateAggregate) and isinstance(dp, CentralDP):
        # Its aux is a DPState already: a second one would replace the first, not nest.
        raise ValueError(
            f"{algorithm.name!r} has central DP already; privatize the algorithm it was made from"
        )
    if isinstance(aggregate, PrivateAggregate):
        stage = cast(PrivateAggregate[Any], aggregate).aggregate
    elif isinstance(aggregate, Aggregate):
        stage = cast(Aggregate[Any], aggregate)
    else:
        raise ValueError(
            "privatize needs an algorithm of the FedAvg family (fedavg, or one built by "
            f"compose: an Aggregate stage); {algorithm.name!r} aggregates by its own rule"
        )
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round must be in [1, num_clients={num_clients}], got {clients_per_round}"
        )
    if sampling not in ("poisson", "fixed"):
        raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
    changes: dict[str, Any] = {
        "sample": poisson_sampler(num_clients, clients_per_round / num_clients)
        if sampling == "poisson"
        else uniform_sampler(num_clients, clients_per_round)
    }
    full = _full_names(algorithm)
    trainable = stage.trainable or full
    buffers = sorted(set(full) - set(trainable))
    if isinstance(dp, CentralDP):
        if buffers and stage.buffers == "aggregate":
            raise ValueError(
                f"central DP privatises the trainable parameters; the model has buffers "
                f"{buffers[:4]} (e.g. BatchNorm statistics) that would be averaged without "
                "noise: use a model without them, or compose(..., aggregate=Aggregate("
                "buffers='with_params')) to clip and noise them as parameters"
            )
        private = PrivateAggregate(stage, dp, float(clients_per_round))
        dp.update_noise_multiplier(float(clients_per_round))  # refuses a spent count budget
        changes["aggregate"] = private
        changes["init"] = PrivateInit(algorithm.init, dp)
    else:
        if buffers:
            raise ValueError(
                f"local DP noises the trainable parameters; the model has buffers "
                f"{buffers[:4]} (e.g. BatchNorm statistics) that clients would send as they "
                "are: use a model without them"
            )
        inner = algorithm.client_update
        names = tuple(trainable)
        vectorizable = isinstance(inner, VectorizedUpdate)
        wrapper = VectorizedLocalNoiseUpdate if vectorizable else LocalNoiseUpdate
        changes["client_update"] = wrapper(inner, dp, names)
    return attrs.evolve(algorithm, **changes)
