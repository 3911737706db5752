"""Client jobs on devices: the static context once per device, the broadcast once per round.

An executor with devices wraps each `ClientJob` it maps in a `PlacedJob`. For client ``k`` on
``device_for(k, devices)`` it runs the job against

- the client update record and client ``k``'s data on that device, placed the first time
  they are needed and then kept for the executor's lifetime (a `Placement` holds them); the
  clients of a lazy sequence, made when read, are placed at every read and not kept;
- the downlink on that device, placed once per map (round) and device;
- the task's own message and stored state on that device;

and returns the uplink on the server's device: where the downlink's tensors came from (the
CPU if it has none). Placement is guarded by a lock, so threads may share one `Placement`
without relying on the GIL.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast, overload

import attrs
import torch

from .._validators import check_int_at_least
from ..errors import ClientError
from ..models import intra_op_threads
from ..records import ClientTask, Uplink
from .base import ClosingContext
from .devices import cuda_determinism, device_for, ensure_cublas_workspace, to_device, uses_cuda
from .jobs import ClientContext, ClientJob

__all__ = [
    "InProcess",
    "PlacedJob",
    "Placement",
    "TaskQueues",
    "holds_clients",
    "owned_groups",
    "placed",
    "server_device",
    "uplink_on",
    "worker_for",
]

Data = TypeVar("Data")
T = TypeVar("T")
R = TypeVar("R")

_CPU = torch.device("cpu")


def placed(placement: Placement, fn: Callable[[T], R]) -> Callable[[T], R]:
    """``fn`` as an executor should run it: a `ClientJob` placed on its devices, else as is.

    A job whose clients and server are all on the plain CPU has nothing to move and runs as
    it is (the fast path).
    """
    if not isinstance(fn, ClientJob):
        return fn
    job = cast(ClientJob[Any], fn)
    if placement.devices == (_CPU,) and server_device(job) == _CPU:
        return cast(Callable[[T], R], job)
    return cast(Callable[[T], R], placement.job(job))


def server_device(job: ClientJob[Any]) -> torch.device:
    """Where a job's uplinks go back to: the device of its downlink's first tensor, else CPU."""
    for tensor in job.downlink.params.values():
        return tensor.device
    return _CPU


def owned_groups(worker: int, workers: int, num_devices: int) -> frozenset[int]:
    """The device indices worker ``worker`` of ``workers`` serves.

    With at least as many devices as workers, the devices are dealt out (worker ``w`` serves
    ``{i : i % workers == w}``); with more workers than devices, worker ``w`` serves device
    ``w % num_devices``. Every device index is served by at least one worker.
    """
    if num_devices >= workers:
        return frozenset(i for i in range(num_devices) if i % workers == worker)
    return frozenset({worker % num_devices})


def worker_for(client_id: int, workers: int, num_devices: int) -> int:
    """The one worker that runs client ``client_id`` when each client must stay on one worker.

    The client's device index is ``client_id % num_devices``; among the workers that own
    that device (`owned_groups`), client ``k`` goes to the ``(k // num_devices)``-th in turn,
    so each client's data is placed by one worker only.
    """
    index = client_id % num_devices
    owners = [w for w in range(workers) if index in owned_groups(w, workers, num_devices)]
    return owners[(client_id // num_devices) % len(owners)]


class TaskQueues:
    """A map's task indices queued for a pool's workers (`Processes` workers, `Ray` actors).

    Client tasks queue by their device index, and a worker takes only its devices' clients
    (`owned_groups`), lowest task index first; other work goes to any worker. With CUDA
    devices a client also stays with one worker among those sharing its device
    (`worker_for`), so its data is placed on the GPU once.
    """

    def __init__(self, tasks: Sequence[object], workers: int, num_devices: int, sticky: bool):
        self._pending: dict[int, deque[int]] = {}
        for index, task in enumerate(tasks):
            if not isinstance(task, ClientTask):
                group = -1
            elif sticky:
                group = -2 - worker_for(task.client_id, workers, num_devices)
            else:
                group = task.client_id % num_devices
            self._pending.setdefault(group, deque()).append(index)
        self._owned = [owned_groups(w, workers, num_devices) | {-1, -2 - w} for w in range(workers)]

    def take(self, worker: int) -> int | None:
        """The next task index for ``worker`` (removed from the queues), or None."""
        queues = [q for g, q in self._pending.items() if g in self._owned[worker] and q]
        if not queues:
            return None
        return min(queues, key=lambda q: q[0]).popleft()


def uplink_on(uplink: Uplink, device: torch.device) -> Uplink:
    """``uplink`` with its parameters and stored state on ``device``."""
    return attrs.evolve(
        uplink, params=to_device(uplink.params, device), state=to_device(uplink.state, device)
    )


class Placement:
    """What an executor keeps on its devices: each context and each client's data, once.

    Attributes:
        devices: client ``k`` runs on ``devices[k % len(devices)]``.
        cuda: whether any device is a CUDA device.
        placements: how many times each ``(client id, device index)``'s data was moved; 1 per
            client and device for the executor's lifetime (what tests check), except for
            lazy clients (`holds_clients`), moved each time a round reads them.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.devices = tuple(devices)
        self.cuda = uses_cuda(self.devices)
        self.placements: Counter[tuple[int, int]] = Counter()
        self._lock = threading.Lock()
        # Memos are per device, not per index: a list that names one GPU twice places the
        # client update there once (the per-index contexts share it).
        self._memos: dict[torch.device, dict[int, Any]] = {}
        self._contexts: dict[tuple[int, int, bool, bool, int], ClientContext[Any]] = {}

    def job(self, job: ClientJob[Data]) -> PlacedJob[Data]:
        """``job`` as a callable that runs each task on its client's device."""
        return PlacedJob(self, job, server_device(job))

    def context(self, context: ClientContext[Data], index: int) -> ClientContext[Data]:
        """``context`` on device ``index``: its update placed now, its clients when first used."""
        # Keyed by what the context holds, like `Processes`: a new ClientContext wrapping the
        # same update and data (one per round) is not placed again.
        device = self.devices[index]
        key = (
            id(context.client_update),
            id(context.clients),
            context.dispatched,
            context.check_global_rng,
            index,
        )
        with self._lock:
            placed = self._contexts.get(key)
            if placed is None:
                update = to_device(context.client_update, device, self._memo(device))
                clients = _PlacedClients(self, context.clients, index)
                placed = attrs.evolve(context, client_update=update, clients=clients)
                # The original context is kept alive by the placed one, so its ids stay unique.
                self._contexts[key] = placed
        return placed

    def client(self, clients: Sequence[Data], client_id: int, index: int) -> Data:
        """Client ``client_id``'s data on device ``index``.

        Data that ``clients`` holds (a tuple or list) is placed through the device's memo, so
        that a base dataset shared by clients moves once; the data of a lazy sequence (any
        other, such as `blazefl_fn.data.synthetic.SyntheticClients`, which makes each client
        when it is read) is placed on its own and not remembered.
        """
        with self._lock:
            self.placements[client_id, index] += 1
            device = self.devices[index]
        if not holds_clients(clients):
            return to_device(clients[client_id], device)
        with self._lock:
            return to_device(clients[client_id], device, self._memo(device))

    def clear(self) -> None:
        """Drop everything placed (releases device memory held for the executor)."""
        with self._lock:
            self._contexts.clear()
            self._memos.clear()

    def _memo(self, device: torch.device) -> dict[int, Any]:
        return self._memos.setdefault(device, {})


def holds_clients(clients: Sequence[object]) -> bool:
    """Whether ``clients`` holds its clients' data (a tuple or list), rather than making each
    client when it is read (a lazy sequence, which executors never keep placed copies of)."""
    return isinstance(clients, tuple | list)


class _PlacedClients(Sequence[Data]):
    """A context's clients on device ``index``: each placed the first time it is read and then
    kept, or, for a lazy sequence (`holds_clients` is false), placed at every read."""

    def __init__(self, placement: Placement, clients: Sequence[Data], index: int) -> None:
        self._placement = placement
        self._clients = clients
        self._keep = holds_clients(clients)
        self._index = index
        self._placed: dict[int, Data] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    @overload
    def __getitem__(self, item: int) -> Data: ...

    @overload
    def __getitem__(self, item: slice) -> Sequence[Data]: ...

    def __getitem__(self, item: int | slice) -> Data | Sequence[Data]:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        if not self._keep:
            # A lazy sequence: kept, its clients would pile up on the device round after round.
            return self._placement.client(self._clients, item, self._index)
        with self._lock:
            data = self._placed.get(item)
            if data is None:
                data = self._placement.client(self._clients, item, self._index)
                self._placed[item] = data
        return data

    def __iter__(self) -> Iterator[Data]:
        return (self[i] for i in range(len(self)))


@attrs.frozen(eq=False)
class PlacedJob(Generic[Data]):
    """A `ClientJob` run on each task's client device; uplinks come back to ``server``."""

    placement: Placement
    job: ClientJob[Data]
    server: torch.device
    _jobs: dict[int, ClientJob[Data]] = attrs.field(
        init=False, factory=lambda: dict[int, ClientJob[Any]]()
    )
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def device_job(self, index: int) -> ClientJob[Data]:
        """The job on device ``index``: the downlink is placed there once per `PlacedJob`."""
        with self._lock:
            job = self._jobs.get(index)
            if job is None:
                device = self.placement.devices[index]
                context = self.placement.context(self.job.context, index)
                job = ClientJob(context, to_device(self.job.downlink, device))
                self._jobs[index] = job
        return job

    def __call__(self, task: ClientTask) -> Uplink:
        """The task's uplink, computed on its client's device.

        Raises:
            ClientError: the update raised, or moving its inputs or uplink failed.
        """
        devices = self.placement.devices
        index = task.client_id % len(devices)
        device = device_for(task.client_id, devices)
        try:
            job = self.device_job(index)
            placed = attrs.evolve(
                task,
                message=to_device(task.message, device),
                state=to_device(task.state, device),
                device=device,
            )
        except Exception as exc:
            raise ClientError(task.client_id, task.round, exc) from exc
        uplink = job(placed)
        if device == self.server:
            return uplink
        try:
            return uplink_on(uplink, self.server)
        except Exception as exc:
            raise ClientError(task.client_id, task.round, exc) from exc


class InProcess(ClosingContext):
    """Base of the executors that run clients in this process: one `Placement` of devices.

    Client work runs with torch's intra-op thread count at ``threads`` (set for the duration
    of a map, the caller's setting restored afterwards) and, on CUDA, with deterministic
    kernels: the two switches the bits depend on. Both are process-wide settings: run one
    simulation at a time in a process (several executors may exist; their maps must not
    overlap in time). ``close`` releases what was placed;
    subclasses that hold more (a thread pool) extend it.
    """

    def __init__(self, devices: Sequence[torch.device], threads: int = 1) -> None:
        self.threads = check_int_at_least("threads", threads, 1)
        self._placement = Placement(devices)
        if self._placement.cuda:
            # torch reads it at the first cuBLAS call in this process: set it before any.
            ensure_cublas_workspace()

    def _pinned(self) -> contextlib.ExitStack:
        """Intra-op threads and CUDA determinism as the bits need them, for one map."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(intra_op_threads(self.threads))
            stack.enter_context(cuda_determinism(self._placement.cuda))
            # Handed over only once both are in place; a failure between them undoes the first.
            return stack.pop_all()

    @property
    def placements(self) -> dict[tuple[int, int], int]:
        """How often each ``(client id, device index)``'s data was moved (empty on the CPU)."""
        return dict(self._placement.placements)

    def close(self) -> None:
        """Release what was placed on the devices."""
        self._placement.clear()
