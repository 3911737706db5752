"""The unit of client work that executors map: a static context, a downlink and small tasks.

A `ClientJob` splits what a round sends clients into the part that never changes during a run
(`ClientContext`: the client update function and every client's data) and the part that
changes each round (the `Downlink`). Executors that cross process boundaries use the split to
send the context once per pool and only the downlink and `ClientTask`s per round.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

import attrs
import torch

from ..errors import ClientError, GlobalRNGError, MissingStage
from ..records import ClientTask, Downlink, Uplink

__all__ = [
    "ClientContext",
    "ClientJob",
    "ClientUpdate",
    "VectorizedUpdate",
    "global_rng_guard",
]

Data = TypeVar("Data")
Data_contra = TypeVar("Data_contra", contravariant=True)


ClientUpdate = Callable[[Downlink, Data, ClientTask], Uplink]
"""One client's work in a round: ``(downlink, data, task) -> uplink``, pure in its arguments."""


@runtime_checkable
class VectorizedUpdate(Protocol[Data_contra]):
    """A client update that can also train a whole chunk of clients in one vectorised pass.

    `blazefl_fn.executors.Vectorized` calls `update_chunk` for updates with these two methods
    (the LocalSGD family: `blazefl_fn.algorithms.stages.TrainUpdate`) and runs any other
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


class _Undispatched(dict[str, torch.Tensor]):
    """The empty message or state of a client whose algorithm has no ``dispatch`` stage."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def __missing__(self, key: str) -> torch.Tensor:
        raise MissingStage(
            f"the client looked up {key!r} in its {self.what}, but the algorithm has no "
            "dispatch stage, so clients receive no message or stored state "
            "(set Algorithm.dispatch; see blazefl_fn.server.client_state)"
        )


_RNG_ADVICE = (
    "torch's global RNG state changed during the client's update, so its bits depend on the "
    "executor and on other clients. Likely causes: nn.Dropout (use "
    "blazefl_fn.client.stochastic.KeyedDropout), or torch.rand/randn/randperm/manual_seed "
    "without a generator (draw from task.key.torch_generator()). Under Threads the draw may "
    "be another client's, running at the same time. To accept nondeterminism, set "
    "attrs.evolve(algorithm, allow_global_rng=True)."
)


# One reader of the global generators' states at a time. torch's ``get_rng_state`` holds the
# generator's mutex while it wraps the state as a Python tensor; if that allocation runs the
# garbage collector and a ``gc.callbacks`` entry (hypothesis registers one) lets the GIL go,
# a second thread entering ``get_rng_state`` waits for the mutex while holding the GIL, and
# both threads stop for good (reproduced: two threads, a GC callback, a tight loop). Waiting
# on this lock releases the GIL instead.
_RNG_READ = threading.Lock()


def _rng_states(device: torch.device) -> tuple[torch.Tensor, ...]:
    with _RNG_READ:
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
        blazefl_fn.errors.GlobalRNGError: torch's global RNG state changed ...
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
