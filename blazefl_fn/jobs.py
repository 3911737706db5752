"""The unit of client work that executors map: a static context, a downlink and small tasks.

A `ClientJob` splits what a round sends clients into the part that never changes during a run
(`ClientContext`: the client update function and every client's data) and the part that
changes each round (the `Downlink`). Executors that cross process boundaries use the split to
send the context once per pool and only the downlink and `ClientTask`s per round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Mapping, Sequence
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
    "GlobalRNGError",
    "MissingStage",
    "NonFiniteError",
    "VectorizedUpdate",
    "global_rng_guard",
]

Data = TypeVar("Data")
Data_contra = TypeVar("Data_contra", contravariant=True)


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


ClientUpdate = Callable[[Downlink, Data, ClientTask], Uplink]
"""One client's work in a round: ``(downlink, data, task) -> uplink``, pure in its arguments."""


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
    """A client's update raised; the original exception is chained as ``__cause__``.

    ``round_index`` is 0-based (the `ServerState.round` the round started from); the message
    counts rounds from 1, as the progress lines and the metrics log do.
    """

    def __init__(self, client_id: int, round_index: int, cause: BaseException) -> None:
        super().__init__(
            f"client {client_id} failed in round {round_index + 1}: {type(cause).__name__}: {cause}"
        )
        self.client_id = client_id
        self.round_index = round_index


class ChunkError(ClientError):
    """A vectorised chunk of clients failed; ``client_id`` is its first client."""

    def __init__(self, client_ids: Sequence[int], round_index: int, cause: BaseException) -> None:
        RuntimeError.__init__(
            self,
            f"the chunk of clients {_id_span(client_ids)} failed in round {round_index + 1}: "
            f"{type(cause).__name__}: {cause}",
        )
        self.client_id = client_ids[0]
        self.client_ids = tuple(client_ids)
        self.round_index = round_index


def _id_span(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    return f"[{shown}{', ...' if len(ids) > 5 else ''}] ({len(ids)} clients)"


class NonFiniteError(RuntimeError):
    """A round produced NaN or infinite values: in clients' uplinks, or in the new server state.

    Attributes:
        round_index: the round, 0-based (the message counts from 1).
        clients: each offending client's id and the entries that were not finite (empty when
            the server model is the culprit).
        server: the new server state's non-finite entries: parameter names, and places in
            its ``aux`` state (``aux.v.1.weight``); empty when clients are the culprit.
        skipping: the algorithm leaves such clients out (``nonfinite="skip"``), and every
            sampled client was one.
    """

    def __init__(
        self,
        round_index: int,
        clients: Mapping[int, Sequence[str]] | None = None,
        server: Sequence[str] = (),
        *,
        skipping: bool = False,
    ) -> None:
        self.round_index = round_index
        self.clients = {cid: tuple(names) for cid, names in (clients or {}).items()}
        self.server = tuple(server)
        self.skipping = skipping
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"round {self.round_index + 1}"
        if self.server:
            in_aux = any(n == "aux" or n.startswith(("aux.", "aux[")) for n in self.server)
            what = "state (model or optimizer) has" if in_aux else "model has"
            return (
                f"{where}: the aggregated server {what} non-finite values (NaN or Inf) in "
                f"{_names(self.server)}; training diverged (lower the learning rate, clip "
                "client updates, or use a robust aggregator)"
            )
        ids = sorted(self.clients)
        first = ids[0]
        if self.skipping:
            return (
                f"{where}: every sampled client ({len(ids)}) sent non-finite values (NaN or "
                f"Inf; client {first}: {_names(self.clients[first])}), so none is left to "
                "aggregate; local training diverged: lower the learning rate or clip updates"
            )
        return (
            f"{where}: client{'s' if len(ids) > 1 else ''} {_id_list(ids)} sent non-finite "
            f"values (NaN or Inf; client {first}: {_names(self.clients[first])}); local "
            "training diverged: lower the learning rate or clip updates, or set "
            "Algorithm.nonfinite='skip' (CLI: --skip-nonfinite) to leave such clients out"
        )


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _id_list(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


class MissingStage(KeyError):
    """A client looked up a message or stored state that no ``dispatch`` stage provides."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing stage"


class _Undispatched(dict[str, torch.Tensor]):
    """The empty message or state of a client whose algorithm has no ``dispatch`` stage."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def __missing__(self, key: str) -> torch.Tensor:
        raise MissingStage(
            f"the client looked up {key!r} in its {self.what}, but the algorithm has no "
            "dispatch stage, so clients receive no message or stored state "
            "(set Algorithm.dispatch; see blazefl_fn.client_state)"
        )


class GlobalRNGError(RuntimeError):
    """A client update drew from (or reseeded) torch's global random number generator."""


_RNG_ADVICE = (
    "torch's global RNG state changed during the client's update, so its bits depend on the "
    "executor and on other clients. Likely causes: nn.Dropout (use "
    "blazefl_fn.stochastic.KeyedDropout), or torch.rand/randn/randperm/manual_seed without a "
    "generator (draw from task.key.torch_generator()). Under Threads the draw may be another "
    "client's, running at the same time. To accept nondeterminism, set "
    "attrs.evolve(algorithm, allow_global_rng=True)."
)


def _rng_states(device: torch.device) -> tuple[torch.Tensor, ...]:
    if device.type == "cuda" and torch.cuda.is_initialized():
        return (torch.random.get_rng_state(), torch.cuda.get_rng_state(device))
    return (torch.random.get_rng_state(),)


def _rng_changed(before: tuple[torch.Tensor, ...], device: torch.device) -> bool:
    # Only the generators that existed before: CUDA initialised during the block is no draw.
    # Compared as bytes (CPU byte tensors): a third of torch.equal's cost per client.
    after = _rng_states(device)
    return any(
        a.numpy().tobytes() != b.numpy().tobytes() for a, b in zip(before, after, strict=False)
    )


@contextlib.contextmanager
def global_rng_guard(enabled: bool, device: torch.device) -> Generator[None]:
    """Raise `GlobalRNGError` if the block changed torch's global RNG (CPU, and ``device``'s).

    Examples:
        >>> with global_rng_guard(True, torch.device("cpu")):
        ...     _ = torch.rand(1)
        Traceback (most recent call last):
        ...
        blazefl_fn.jobs.GlobalRNGError: torch's global RNG state changed ...
    """
    if not enabled:
        yield
        return
    before = _rng_states(device)
    yield
    if _rng_changed(before, device):
        raise GlobalRNGError(_RNG_ADVICE)


@attrs.frozen(eq=False)
class ClientContext(Generic[Data]):
    """What stays the same for a whole run: the client update and all clients' data.

    Attributes:
        client_update: one client's work.
        clients: every client's data, by id.
        dispatched: the algorithm has a ``dispatch`` stage; without one, a client that looks
            up a message or state entry fails with `MissingStage` naming the missing stage.
        check_global_rng: fail a client that changes torch's global RNG (`GlobalRNGError`).
    """

    client_update: ClientUpdate[Data]
    clients: Sequence[Data]
    dispatched: bool = True
    check_global_rng: bool = True


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
            ClientError: the update raised (e.g. `MissingStage`, `GlobalRNGError`), or
                returned an uplink naming another client.
        """
        data = self.context.clients[task.client_id]
        if not self.context.dispatched and not task.state and not task.message:
            task = attrs.evolve(
                task, message=_Undispatched("message"), state=_Undispatched("stored state")
            )
        # Inline rather than `global_rng_guard`: this runs once per client, on the hot path.
        before = _rng_states(task.device) if self.context.check_global_rng else None
        try:
            uplink = self.context.client_update(self.downlink, data, task)
            if before is not None and _rng_changed(before, task.device):
                raise GlobalRNGError(_RNG_ADVICE)
        except (Exception, SystemExit) as exc:
            # SystemExit too: a client calling sys.exit() must fail its round, not end the
            # driver (under Sequential and Threads it runs in the driving process).
            raise ClientError(task.client_id, task.round, exc) from exc
        if uplink.client_id != task.client_id:
            wrong = ValueError(f"uplink names client {uplink.client_id}")
            raise ClientError(task.client_id, task.round, wrong)
        return uplink
