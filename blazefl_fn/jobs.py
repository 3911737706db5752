"""The unit of client work that executors map: a static context, a downlink and small tasks.

A `ClientJob` splits what a round sends clients into the part that never changes during a run
(`ClientContext`: the client update function and every client's data) and the part that
changes each round (the `Downlink`). Executors that cross process boundaries use the split to
send the context once per pool and only the downlink and `ClientTask`s per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

import attrs
import torch

from .keys import Key
from .records import Downlink, Uplink
from .tree import Params

__all__ = [
    "ChunkError",
    "ClientContext",
    "ClientError",
    "ClientJob",
    "ClientTask",
    "ClientUpdate",
    "VectorizedUpdate",
]

Data = TypeVar("Data")
Data_contra = TypeVar("Data_contra", contravariant=True)


@attrs.frozen(eq=False)
class ClientTask:
    """One client's work in one round: who, when, its key, and what only it receives.

    Attributes:
        client_id: the client.
        round: the round index (0-based).
        key: the client's key for this round.
        message: the part of the downlink meant for this client alone (e.g. SCARLET's cache
            catch-up); sent over the network, so it counts in ``RoundReport.bytes_down``.
        state: the client's own stored state from its previous round (e.g. its local model),
            as `Algorithm.dispatch` hands it over; it stays on the client, so it is not
            counted as communication.
        device: the device the client runs on, set by the executor (its data, the downlink,
            ``message`` and ``state`` are already there); a client update that makes new
            tensors makes them here.
    """

    client_id: int
    round: int
    key: Key
    message: Params = attrs.field(factory=dict[str, torch.Tensor])
    state: Params = attrs.field(factory=dict[str, torch.Tensor])
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))


ClientUpdate = Callable[[Downlink, Data, ClientTask], Uplink]


@runtime_checkable
class VectorizedUpdate(Protocol[Data_contra]):
    """A client update that can also train a whole chunk of clients in one vectorised pass.

    `blazefl_fn.executors.Vectorized` calls `update_chunk` for updates with these two methods
    (the LocalSGD family: `blazefl_fn.algorithms.fedavg.LocalSGDUpdate`) and runs any other
    update one client at a time. ``update_chunk`` must give, per task, what the update's
    ``__call__`` gives up to float rounding.
    """

    def update_chunk(
        self, downlink: Downlink, data: Sequence[Data_contra], tasks: Sequence[ClientTask]
    ) -> list[Uplink]:
        """The uplinks of ``tasks`` (in order), client ``i`` training on ``data[i]``."""
        ...

    def client_bytes(self, downlink: Downlink, data: Data_contra) -> int:
        """About how many bytes one client like ``data`` adds to a chunk at its peak.

        Raises:
            ValueError: this update cannot be vectorised (e.g. a dropout layer); the message
                says why.
        """
        ...


class ClientError(RuntimeError):
    """A client's update raised; the original exception is chained as ``__cause__``."""

    def __init__(self, client_id: int, round_index: int, cause: BaseException) -> None:
        super().__init__(
            f"client {client_id} failed in round {round_index}: {type(cause).__name__}: {cause}"
        )
        self.client_id = client_id
        self.round_index = round_index


class ChunkError(ClientError):
    """A vectorised chunk of clients failed; ``client_id`` is its first client."""

    def __init__(self, client_ids: Sequence[int], round_index: int, cause: BaseException) -> None:
        RuntimeError.__init__(
            self,
            f"the chunk of clients {_id_span(client_ids)} failed in round {round_index}: "
            f"{type(cause).__name__}: {cause}",
        )
        self.client_id = client_ids[0]
        self.client_ids = tuple(client_ids)
        self.round_index = round_index


def _id_span(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    return f"[{shown}{', ...' if len(ids) > 5 else ''}] ({len(ids)} clients)"


@attrs.frozen(eq=False)
class ClientContext(Generic[Data]):
    """What stays the same for a whole run: the client update and all clients' data."""

    client_update: ClientUpdate[Data]
    clients: Sequence[Data]


@attrs.frozen(eq=False)
class ClientJob(Generic[Data]):
    """Runs one `ClientTask` against a context and a downlink; what executors map.

    A record rather than a closure, so that it can be sent to worker processes.
    """

    context: ClientContext[Data]
    downlink: Downlink

    def __call__(self, task: ClientTask) -> Uplink:
        """The task's uplink.

        Raises:
            ClientError: the update raised, or returned an uplink naming another client.
        """
        data = self.context.clients[task.client_id]
        try:
            uplink = self.context.client_update(self.downlink, data, task)
        except Exception as exc:
            raise ClientError(task.client_id, task.round, exc) from exc
        if uplink.client_id != task.client_id:
            wrong = ValueError(f"uplink names client {uplink.client_id}")
            raise ClientError(task.client_id, task.round, wrong)
        return uplink
