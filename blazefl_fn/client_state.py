"""Per-client stored state kept by the server between rounds, as algorithm stages.

A stateful algorithm (SCAFFOLD's control variates, FedDyn's gradients, DS-FL's local models)
keeps one tree per client in its ``ServerState.aux``: `initial_states` makes the record of a
federation where nobody has taken part yet (empty trees), `dispatch_states` hands each sampled
client its tree as `ClientTask.state` (not communication), and `collect_states` stores what
the clients returned in ``Uplink.state``. An empty tree means "never took part"; each algorithm
says what that stands for (SCAFFOLD: zero control variates).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .records import Uplink
from .round import ClientInput
from .tree import Params

__all__ = ["ClientStates", "collect_states", "dispatch_states", "initial_states"]

ClientStates = tuple[Params, ...]
"""Every client's stored tree, by client id (empty: the client has not taken part yet)."""


def initial_states(num_clients: int) -> ClientStates:
    """The states of ``num_clients`` clients before any has taken part.

    Raises:
        ValueError: ``num_clients < 1``.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    # One dict per client (not one shared): nothing writes into them, but nothing could leak.
    return tuple(dict[str, torch.Tensor]() for _ in range(num_clients))


def dispatch_states(states: ClientStates, ids: Sequence[int]) -> list[ClientInput]:
    """Each sampled client's stored tree, as its `ClientInput` (a ``dispatch`` stage's result).

    Examples:
        >>> import torch
        >>> kept = Uplink(1, 5, {}, state={"c": torch.ones(1)})
        >>> states = collect_states(initial_states(3), [kept])
        >>> [dict(i.state) for i in dispatch_states(states, [0, 1])]
        [{}, {'c': tensor([1.])}]
    """
    return [ClientInput(state=states[i]) for i in ids]


def collect_states(states: ClientStates, uplinks: Sequence[Uplink]) -> ClientStates:
    """``states`` with each uplink's ``state`` stored for its client (a new tuple).

    Raises:
        ValueError: an uplink names a client outside ``states``.
    """
    out = list(states)
    for uplink in uplinks:
        if not 0 <= uplink.client_id < len(out):
            raise ValueError(
                f"uplink of client {uplink.client_id} is outside the {len(out)} stored clients"
            )
        out[uplink.client_id] = uplink.state
    return tuple(out)
