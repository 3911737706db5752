"""Per-client stored state kept by the server between rounds, as algorithm stages.

The public home of `ClientStore`, `StateLayout` and `StoreOptions` (implemented in
``_client_store``, with its spill files in ``_store_backing``).

A stateful algorithm (SCAFFOLD's control variates, FedDyn's gradients, DS-FL's local models)
keeps one tree per client in a `ClientStore` inside its ``ServerState.aux``:
`initial_states` makes the store of a federation where nobody has taken part yet (it holds
nothing, whatever the federation's size), `dispatch_states` hands each sampled client its tree
as `ClientTask.state` (not communication), and `collect_states` stores what the clients
returned in ``Uplink.state``. An empty tree means "never took part"; each algorithm says what
that stands for (SCAFFOLD: zero control variates). Every stage costs O(sampled clients).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..records import ClientInput, Uplink
from ._client_store import ClientStore as ClientStore
from ._client_store import StateLayout as StateLayout
from ._client_store import StoreOptions as StoreOptions

__all__ = [
    "ClientStates",
    "ClientStore",
    "StateLayout",
    "StoreOptions",
    "collect_states",
    "dispatch_states",
    "initial_states",
]

ClientStates = ClientStore
"""Every client's stored tree, by client id (empty: the client has not taken part yet)."""


def initial_states(
    num_clients: int, options: StoreOptions | None = None, layout: StateLayout | None = None
) -> ClientStore:
    """The states of ``num_clients`` clients before any has taken part (an empty store).

    Args:
        num_clients: the federation's size.
        options: the store's memory budget and spill directory (`StoreOptions`).
        layout: what every client's state holds (`StateLayout`), checked whenever a state is
            stored or restored from a checkpoint; None accepts anything.

    Raises:
        ValueError: ``num_clients < 1``.
    """
    return ClientStore(num_clients, options, layout=layout)


def dispatch_states(states: ClientStore, ids: Sequence[int]) -> list[ClientInput]:
    """Each sampled client's stored tree, as its `ClientInput` (a ``dispatch`` stage's result).

    Examples:
        >>> import torch
        >>> kept = Uplink(1, 5, {}, state={"c": torch.ones(1)})
        >>> states = collect_states(initial_states(3), [kept])
        >>> [dict(i.state) for i in dispatch_states(states, [0, 1])]
        [{}, {'c': tensor([1.])}]
    """
    return [ClientInput(state=states[i]) for i in ids]


def collect_states(states: ClientStore, uplinks: Sequence[Uplink]) -> ClientStore:
    """``states`` with each uplink's ``state`` stored for its client (a new store).

    Raises:
        ValueError: an uplink names a client outside ``states``.
    """
    for uplink in uplinks:
        if not 0 <= uplink.client_id < states.num_clients:
            raise ValueError(
                f"uplink of client {uplink.client_id} is outside the "
                f"{states.num_clients} stored clients"
            )
    return states.updated({u.client_id: u.state for u in uplinks})
