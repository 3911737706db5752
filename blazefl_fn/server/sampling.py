"""Which clients take part in a round: samplers, pure functions of the state and the key.

A sampler is ``(state, key) -> client ids``: `uniform_sampler` draws a fixed number without
replacement (FedAvg's), `poisson_sampler` includes each client independently with a fixed rate
(what DP accountants assume). Both draw only from the round's key, so the same key gives the
same clients on every executor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs

from .._validators import finite_number, int_at_least
from ..keys import Key
from ..records import ServerState

__all__ = [
    "PoissonSampler",
    "poisson_sampler",
    "uniform_sampler",
]


Sampler = Callable[[ServerState, Key], Sequence[int]]


def uniform_sampler(num_clients: int, clients_per_round: int) -> Sampler:
    """Samples ``clients_per_round`` distinct clients uniformly from ``num_clients``.

    Raises:
        ValueError: ``num_clients < 1`` or ``clients_per_round`` not in ``[1, num_clients]``.

    Examples:
        >>> from blazefl_fn.records import ServerState
        >>> sample = uniform_sampler(100, 3)
        >>> len(set(sample(ServerState(params={}), Key.from_seed(0))))
        3
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round must be in [1, num_clients={num_clients}], got {clients_per_round}"
        )

    def sample(_state: ServerState, key: Key) -> tuple[int, ...]:
        return key.choice(num_clients, clients_per_round)

    return sample


@attrs.frozen
class PoissonSampler:
    """Poisson sampling: every client takes part independently with probability ``rate``.

    The number of clients varies from round to round and may be zero (the round then runs
    with no client: the aggregate sees no uplink). This is the sampling DP accountants assume
    for the sampled Gaussian mechanism (`blazefl_fn.privacy`). Costs O(num_clients) per round
    (`Key.bernoulli`).
    """

    num_clients: int = attrs.field(validator=int_at_least(1))
    rate: float = attrs.field(validator=finite_number(positive=True, high=1.0))
    allows_empty: ClassVar[bool] = True

    def __call__(self, _state: ServerState, key: Key) -> tuple[int, ...]:
        return key.bernoulli(self.num_clients, self.rate)


def poisson_sampler(num_clients: int, rate: float) -> PoissonSampler:
    """A `PoissonSampler` over ``num_clients`` clients.

    Raises:
        ValueError: ``num_clients < 1`` or ``rate`` not in ``(0, 1]``.

    Examples:
        >>> from blazefl_fn.records import ServerState
        >>> sample = poisson_sampler(1000, 0.01)
        >>> 0 < len(sample(ServerState(params={}), Key.from_seed(0))) < 30
        True
    """
    return PoissonSampler(num_clients, rate)
