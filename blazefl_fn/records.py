"""Frozen records for everything that crosses a boundary: state, downlink, uplink, report.

Records hold tensors as values: nothing in the library writes into a tensor held by a record.
Equality is identity (``eq=False``) because tensor equality is elementwise; compare trees with
`blazefl_fn.tree.digest` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic

import attrs
import torch
from typing_extensions import TypeVar

from .keys import Key
from .tree import Params

__all__ = [
    "ClientInput",
    "ClientTask",
    "Downlink",
    "RoundReport",
    "ServerState",
    "Uplink",
]

_non_negative = attrs.validators.ge(0)


def _empty_params() -> dict[str, torch.Tensor]:
    return {}


def _empty_metrics() -> dict[str, float]:
    return {}


# Covariant: a ``ServerState[ScaffoldState]`` is a ``ServerState[object]``. The default keeps
# a bare ``ServerState`` meaning "any aux", as before the parameter existed.
Aux = TypeVar("Aux", covariant=True, default=object)


@attrs.frozen(eq=False)
class ServerState(Generic[Aux]):
    """The server's whole state between rounds, generic in the algorithm's own state ``Aux``.

    Attributes:
        params: the global model parameters (a model ``state_dict``).
        round: how many rounds have completed.
        aux: the algorithm's own state, e.g. a server optimizer's moments (a frozen record of
            tensors); an empty dict for FedAvg. Checkpoints store it if it is built from
            tensors, scalars, str-keyed mappings, tuples, lists and attrs records. Annotate
            a stage with ``ServerState[MyAux]`` and pyright checks every use of ``aux``.

    Examples:
        >>> import torch
        >>> state: ServerState[dict[str, torch.Tensor]] = ServerState({}, aux={"m": torch.ones(1)})
        >>> state.aux["m"]
        tensor([1.])
    """

    params: Params
    round: int = attrs.field(default=0, validator=_non_negative)
    aux: Aux = attrs.field(factory=_empty_params)  # pyright: ignore[reportAssignmentType]


@attrs.frozen(eq=False)
class Downlink:
    """What the server sends every sampled client in a round."""

    round: int = attrs.field(validator=_non_negative)
    params: Params


@attrs.frozen(eq=False)
class Uplink:
    """What one client returns after its local update.

    Attributes:
        client_id: the client that produced it.
        num_examples: examples the client trained on (the aggregation weight in FedAvg).
        params: what the client sends back, e.g. its updated parameters or its soft labels;
            counted in ``RoundReport.bytes_up``.
        metrics: scalar training metrics, e.g. ``{"loss": ...}`` (mean over its examples).
        state: the client's new stored state (its local model, caches), for algorithms whose
            clients keep state between rounds; it stays on the client, so it is not counted
            as communication.
        steps: local optimizer steps the client took (`LocalResult.steps`); FedNova
            normalises by it. 0 for updates that do not report it.
    """

    client_id: int = attrs.field(validator=_non_negative)
    num_examples: int = attrs.field(validator=_non_negative)
    params: Params
    metrics: Mapping[str, float] = attrs.field(factory=_empty_metrics)
    state: Params = attrs.field(factory=_empty_params)
    steps: int = attrs.field(default=0, validator=_non_negative)


@attrs.frozen
class RoundReport:
    """What happened in one round (plain numbers, safe to log as JSON).

    Attributes:
        round: 0-based index of the round that produced this report (the `ServerState.round`
            it started from).
        clients: the sampled client ids, in aggregation order.
        num_examples: total training examples over the sampled clients.
        train_metrics: client metrics averaged with weights ``num_examples``.
        bytes_down: bytes of tensors sent to clients (numel x element size, summed over
            clients): the common downlink once per sampled client plus each client's own
            message.
        bytes_up: bytes of tensors sent back (the uplinks' ``params``).
        seconds: wall-clock seconds the round took.
        skipped: sampled clients left out of the aggregate because their uplink held NaN or
            infinite values (`Algorithm.nonfinite` ``"skip"``); ``num_examples`` and
            ``train_metrics`` count only the others.
    """

    round: int
    clients: tuple[int, ...]
    num_examples: int
    train_metrics: Mapping[str, float]
    bytes_down: int
    bytes_up: int
    seconds: float
    skipped: tuple[int, ...] = ()


# Devices are immutable: one default shared by every task (a factory ran once per client).
_CPU = torch.device("cpu")


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
    device: torch.device = attrs.field(default=_CPU)


@attrs.frozen(eq=False)
class ClientInput:
    """What one sampled client receives besides the common downlink.

    Attributes:
        message: data for this client alone; counted as communication (``bytes_down``).
        state: the client's stored state from its last round; not communication.
    """

    message: Params = attrs.field(factory=dict[str, torch.Tensor])
    state: Params = attrs.field(factory=dict[str, torch.Tensor])
