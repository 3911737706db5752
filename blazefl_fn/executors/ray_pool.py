"""`Ray`: client work on a pool of long-lived Ray actors, with the same bits as `Sequential`.

What travels, for the `ClientJob`s that rounds map:

- once per executor and context: the client update and every client's data, put into Ray's
  object store once (`Ray.prepare`) and held by every actor. A lazy sequence of clients
  (`blazefl_fn.data.synthetic.SyntheticClients`) travels as its small record, and each actor
  makes the clients it runs;
- once per round: the downlink, put once and bound by each actor before its tasks;
- per client: the task ``(client id, round, key, message, state)``; the uplink comes back
  through the object store, its tensors as raw bytes (not through `torch.save`). Short
  clients travel several to an actor call. Results are returned in task order.

Actors are started with ``max_restarts=0`` and ``max_task_retries=0``: Ray never reruns a
client behind the caller's back. A client that raises surfaces as `ClientError` (with the
actor's traceback chained); an actor or node that dies surfaces as `WorkerError` naming the
clients it was running. Ray is an optional extra (``pip install 'blazefl_fn[ray]'``), imported
only when a `Ray` executor is made.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch

from .. import portable
from .._validators import check_int_at_least, check_local_ip, check_ray_address, check_timeout
from ..errors import WorkerError
from ..records import ClientTask
from ._errors import error_reply, rebuild_error
from ._placement import Placement, TaskQueues, placed
from ._ray_local import (
    probe,
    ray_processes,
    reap,
    session_dir,
    signals_kept,
    stop_watch,
    watch_local_instance,
)
from ._wire import Packed
from .base import ClosingContext
from .devices import cuda_determinism
from .jobs import ClientContext, ClientJob

__all__ = ["Ray", "join_ray_cluster"]

T = TypeVar("T")
R = TypeVar("R")

# Calls kept in flight per actor: the second hides the round trip of the first's results.
_DEPTH = 2
# Tasks per actor call: a Ray call costs milliseconds, so many short clients share one; each
# actor still gets several calls per map so that the load stays balanced.
_MAX_CHUNK = 32
_CALLS_PER_ACTOR = 8
# How often a waiting map wakes up to notice an interrupt.
_POLL_SECONDS = 0.5


def _import_ray() -> Any:
    # Imported here, and typed as Any: Ray is an optional extra the core never needs.
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError("the Ray executor needs Ray: pip install 'blazefl_fn[ray]'") from exc


def join_ray_cluster(address: str, node_ip_address: str | None = None) -> Any:
    """Connect this process, as a driver, to the running Ray cluster at ``address`` (unless it
    is connected already), keeping the command line's own SIGINT and SIGTERM handlers.

    Leave with ``ray.shutdown()``: the cluster runs on. ``Ray(address)`` joins this way.

    Args:
        address: the cluster's ``HOST:PORT``, ``auto`` or a ``ray://`` address.
        node_ip_address: this machine's Ray node IP (a loopback address keeps a single-machine
            cluster off the network).

    Returns:
        The ``ray`` module, connected.

    Raises:
        ImportError: Ray is not installed.
        ValueError: a malformed address or an IP this machine does not have.
        ConnectionError: nothing answers at ``address`` within seconds.

    Examples:
        >>> ray = join_ray_cluster("127.0.0.2:6379")  # doctest: +SKIP
        >>> ray.shutdown()  # doctest: +SKIP
    """
    check_ray_address("address", address)
    if node_ip_address is not None:
        check_local_ip("node_ip_address", node_ip_address)
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    probe(address)
    options: dict[str, Any] = {"address": address, "logging_level": logging.ERROR}
    if node_ip_address is not None:
        options["_node_ip_address"] = node_ip_address
    with signals_kept():
        ray.init(**options)
    return ray


def _syntax_devices(devices: Sequence[str | torch.device]) -> tuple[str, ...]:
    """Device names checked for form only: they are resolved inside the actors."""
    if isinstance(devices, str | torch.device) or not devices:
        raise ValueError(f"devices must be a non-empty sequence of devices, got {devices!r}")
    names: list[str] = []
    for device in devices:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"malformed device {device!r}") from None
        if parsed.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {str(device)!r} (cpu and cuda only)")
        names.append(str(parsed))
    return tuple(names)


class _Actor:
    """One worker of the pool: holds contexts, binds a round's job, runs tasks in order."""

    def __init__(self, threads: int, devices: tuple[str, ...]) -> None:
        torch.set_num_threads(threads)
        self._placement = Placement(tuple(torch.device(d) for d in devices))
        self._contexts: dict[int, ClientContext[Any]] = {}
        self._fn: Callable[[Any], Any] | None = None
        self._determinism = contextlib.ExitStack()
        if self._placement.cuda:
            # The actor does nothing but client work: deterministic kernels for its lifetime.
            self._determinism.enter_context(cuda_determinism())

    def ready(self) -> int:
        return os.getpid()

    def add_context(self, key: int, context: ClientContext[Any]) -> None:
        self._contexts[key] = context

    def bind_job(self, key: int, downlink: Any) -> None:
        job = placed(self._placement, ClientJob(self._contexts[key], downlink))
        # A job's results are uplinks: they travel packed (see `_wire`).
        self._fn = lambda task: Packed(job(task))

    def bind_fn(self, fn: Callable[[Any], Any]) -> None:
        self._fn = fn

    def run(self, indices: list[int], tasks: list[Any]) -> list[tuple[Any, ...]]:
        """One reply per task, in order: ``("ok", index, result)`` or an `error_reply`."""
        assert self._fn is not None
        replies: list[tuple[Any, ...]] = []
        for index, task in zip(indices, tasks, strict=True):
            try:
                replies.append(("ok", index, self._fn(task)))
            except Exception as exc:
                replies.append(error_reply(index, exc))
        return replies


class Ray(ClosingContext):
    """Maps tasks over a pool of Ray actors, locally or on a cluster; the same bits as `Sequential`.

    Args:
        address: None starts a local Ray instance that `close` shuts down again; an address
            (``"127.0.0.1:6379"``, ``"auto"``) joins a running cluster and leaves it running.
            If this process is already connected to Ray, that connection is used and kept.
        workers: actors in the pool (default: the cluster's CPUs / ``num_cpus_per_worker``).
        num_cpus_per_worker: CPUs Ray reserves for each actor.
        num_gpus_per_worker: GPUs Ray reserves for each actor; then ``devices`` defaults to
            ``["cuda"]``, which each actor resolves to the GPU Ray gave it.
        threads: torch intra-op threads in each actor (default 1, as on every executor); the
            server's side of each round runs at the same count in the driver, so every
            executor given it computes the same bits.
        devices: where clients train, client ``k`` on ``devices[k % len(devices)]``; actors own
            devices as `Processes` workers do and run only their devices' clients.
        node_ip_address: the IP address of this machine's Ray node, for a local instance or
            to join a cluster (e.g. a loopback address for a single-machine cluster).
        start_timeout: seconds to wait for every actor to start (the cluster may lack the
            resources they ask for).
        client_timeout: seconds an actor may spend on one client (None: no limit). An actor
            that exceeds it (stuck, stopped, its node frozen) is killed and the map raises
            `WorkerError` naming the client and round; clients then travel one per actor call,
            so that each is timed alone.

    Raises:
        ImportError: Ray is not installed.
        ValueError: a bad argument.
        WorkerError: the actors could not be started.

    Examples:
        >>> with Ray(workers=2) as ex:  # doctest: +SKIP
        ...     ex.map(lambda x: x * x, [1, 2, 3])
        [1, 4, 9]
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        *,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        threads: int = 1,
        devices: Sequence[str | torch.device] | None = None,
        node_ip_address: str | None = None,
        start_timeout: float = 120.0,
        client_timeout: float | None = None,
    ) -> None:
        self.client_timeout = check_timeout("client_timeout", client_timeout)
        if address is not None:
            check_ray_address("address", address)
        if node_ip_address is not None:
            check_local_ip("node_ip_address", node_ip_address)
        if workers is not None:
            check_int_at_least("workers", workers, 1)
        check_int_at_least("threads", threads, 1)
        for name, value in (
            ("num_cpus_per_worker", num_cpus_per_worker),
            ("num_gpus_per_worker", num_gpus_per_worker),
        ):
            # Checked at run time: callers may pass anything despite the annotation.
            if isinstance(value, bool) or not isinstance(cast(object, value), int | float):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if devices is None:
            devices = ("cuda",) if num_gpus_per_worker > 0 else ("cpu",)
        self.devices = _syntax_devices(devices)
        self._cuda = any(torch.device(d).type == "cuda" for d in self.devices)
        self.threads = threads
        self.address = address
        self._ray = _import_ray()
        self._started = False
        self._closed = False
        # Stops the watcher of a local instance this executor started (`_ray_watch`).
        self._stop_watch: Callable[[], object] | None = None
        self._session: str | None = None
        self._actors: list[Any] = []
        self._contexts: dict[tuple[int, int, bool, bool], tuple[int, ClientContext[Any]]] = {}
        # How many times a client context was sent to the actors (once per context).
        self.context_sends = 0
        try:
            self._connect(address, workers, num_cpus_per_worker, node_ip_address)
            self.workers = (
                workers if workers is not None else self._default_workers(num_cpus_per_worker)
            )
            # A portable driver makes portable actors: the pins must be in their environment
            # before they import torch (a cluster started elsewhere does not have them).
            pins = {"runtime_env": {"env_vars": dict(portable.PINS)}} if portable.pinned() else {}
            actor = self._ray.remote(
                num_cpus=num_cpus_per_worker,
                num_gpus=num_gpus_per_worker,
                max_restarts=0,
                max_task_retries=0,
                **pins,
            )(_Actor)
            self._actors = [actor.remote(threads, self.devices) for _ in range(self.workers)]
            self.pids: list[int] = self._ray.get(
                [a.ready.remote() for a in self._actors], timeout=start_timeout
            )

        except BaseException as exc:
            timed_out = isinstance(exc, self._ray.exceptions.GetTimeoutError)
            message = (
                f"{len(self._actors)} Ray actors did not start within {start_timeout} s: each "
                f"asks for {num_cpus_per_worker} CPU and {num_gpus_per_worker} GPU, the cluster "
                f"has {self._resources()}"
                if timed_out
                else f"the Ray actors could not be started: {exc}"
            )
            self._shutdown()
            if timed_out:
                raise WorkerError(message) from None
            if isinstance(exc, self._ray.exceptions.RayError):
                raise WorkerError(message) from exc
            raise

    # -- public --------------------------------------------------------------------------------

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``, spread over the actors, in task order.

        Raises:
            ClientError: a client job failed (the first in task order), with the actor's
                traceback chained below the original exception. The pool stays usable.
            WorkerError: an actor or its node died; the pool is closed.
            RuntimeError: the executor is closed.
        """
        if self._closed:
            raise RuntimeError("this Ray executor is closed")
        if not tasks:
            return []
        try:
            self._bind(fn)
            results, failure = self._run(tasks)
        except BaseException:
            # Interrupted, or an actor died: no actor may outlive the failure.
            self._shutdown()
            raise
        if failure is not None:
            raise failure
        return results

    def prepare(self, context: ClientContext[Any]) -> None:
        """Put ``context`` (the client update and every client's data) in the object store
        and hand it to every actor now, once; `make_round` calls this.

        Raises:
            RuntimeError: the executor is closed.
        """
        if self._closed:
            raise RuntimeError("this Ray executor is closed")
        try:
            self._context_key(context)
        except BaseException:
            self._shutdown()
            raise

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it. Idempotent."""
        self._shutdown()

    def __repr__(self) -> str:
        where = "local" if self.address is None else repr(self.address)
        return f"Ray({where}, workers={len(self._actors)}, devices={list(self.devices)})"

    # -- internals -----------------------------------------------------------------------------

    def _connect(
        self,
        address: str | None,
        workers: int | None,
        num_cpus_per_worker: float,
        node_ip_address: str | None,
    ) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        if address is not None:
            join_ray_cluster(address, node_ip_address)
            self._started = True
            return
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.ERROR,
        }
        if workers is not None:
            options["num_cpus"] = max(1, int(workers * max(num_cpus_per_worker, 1)))
        if node_ip_address is not None:
            options["_node_ip_address"] = node_ip_address
        with signals_kept():
            ray.init(**options)
        self._started = True
        # At once, not after the actors: a driver killed while they start is covered too.
        self._session = session_dir(ray)
        watch = watch_local_instance(os.path.dirname(ray.__file__), self._session)
        if watch is not None:
            self._stop_watch = weakref.finalize(self, stop_watch, watch)

    def _resources(self) -> str:
        try:
            total = self._ray.cluster_resources()
        except Exception:
            return "unknown resources (Ray is not reachable)"
        return f"{total.get('CPU', 0)} CPU and {total.get('GPU', 0)} GPU"

    def _default_workers(self, num_cpus_per_worker: float) -> int:
        cpus = float(self._ray.cluster_resources().get("CPU", 1))
        return max(1, int(cpus // num_cpus_per_worker) if num_cpus_per_worker > 0 else 1)

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self._actors = []
        self._contexts.clear()
        if self._started and ray.is_initialized():
            # Every process of an instance this executor started, taken while its tree is
            # whole: Ray's shutdown leaves the raylet's agents to notice on their own.
            package = os.path.dirname(ray.__file__)
            mine = ray_processes(package, self._session) if self._stop_watch else []
            ray.shutdown()
            reap(mine)
        if self._stop_watch is not None:
            self._stop_watch()

    def _context_key(self, context: ClientContext[Any]) -> int:
        # Keyed by the identity of what a context holds, as in `Processes`: the ClientContext
        # made each round around the same update and data is not sent again.
        identity = (
            id(context.client_update),
            id(context.clients),
            context.dispatched,
            context.check_global_rng,
        )
        known = self._contexts.get(identity)
        if known is None:
            key = len(self._contexts)
            ref = self._ray.put(context)
            self._ray.get([a.add_context.remote(key, ref) for a in self._actors])
            known = (key, context)
            self._contexts[identity] = known
            self.context_sends += 1
        return known[0]

    def _bind(self, fn: Callable[[Any], Any]) -> None:
        """Tell every actor what this map runs; the actor runs the binds before the tasks."""
        if isinstance(fn, ClientJob):
            job = cast(ClientJob[Any], fn)
            key = self._context_key(job.context)
            downlink = self._ray.put(job.downlink)
            for actor in self._actors:
                actor.bind_job.remote(key, downlink)
        else:
            function = self._ray.put(fn)
            for actor in self._actors:
                actor.bind_fn.remote(function)

    def _run(self, tasks: Sequence[Any]) -> tuple[list[Any], BaseException | None]:
        """Results in task order and the first task failure in task order, if any."""
        ray = self._ray
        queues = TaskQueues(tasks, len(self._actors), len(self.devices), self._cuda)
        chunk = max(1, min(_MAX_CHUNK, len(tasks) // (len(self._actors) * _CALLS_PER_ACTOR)))
        if self.client_timeout is not None:
            chunk = 1  # each client timed alone
        inflight: dict[Any, tuple[int, list[int]]] = {}  # ref -> (actor, task indices)
        load = [0] * len(self._actors)
        # Per actor: its calls in the order it runs them, and when the first of them began
        # (its predecessor's end, or its submission to an idle actor).
        queued: list[deque[Any]] = [deque() for _ in self._actors]
        since = [0.0] * len(self._actors)
        results: list[Any] = [None] * len(tasks)
        failures: dict[int, BaseException] = {}

        def feed(actor: int) -> None:
            while not failures and load[actor] < _DEPTH:
                indices: list[int] = []
                while len(indices) < chunk:
                    index = queues.take(actor)
                    if index is None:
                        break
                    indices.append(index)
                if not indices:
                    return
                ref = self._actors[actor].run.remote(indices, [tasks[i] for i in indices])
                inflight[ref] = (actor, indices)
                if not queued[actor]:
                    since[actor] = time.monotonic()
                queued[actor].append(ref)
                load[actor] += 1

        for actor in range(len(self._actors)):
            feed(actor)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=self._patience(queued, since))
            for ref in done:
                actor, indices = inflight.pop(ref)
                load[actor] -= 1
                # An actor runs its calls in order: the next one starts as this one ends.
                queued[actor].remove(ref)
                since[actor] = time.monotonic()
                try:
                    replies = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise self._death(actor, indices, inflight, tasks, exc) from exc
                for reply in replies:
                    if reply[0] == "ok":
                        results[reply[1]] = reply[2]
                    else:
                        failures[reply[1]] = rebuild_error(reply)
                feed(actor)
            if self.client_timeout is not None:
                self._check_stuck(queued, since, inflight, tasks)
        return results, failures[min(failures)] if failures else None

    def _patience(self, queued: list[deque[Any]], since: list[float]) -> float:
        """How long to wait for a result: until the oldest running client's deadline at most."""
        if self.client_timeout is None:
            return _POLL_SECONDS
        starts = [since[a] for a, calls in enumerate(queued) if calls]
        if not starts:
            return _POLL_SECONDS
        left = min(starts) + self.client_timeout - time.monotonic()
        return max(0.0, min(_POLL_SECONDS, left))

    def _check_stuck(
        self,
        queued: list[deque[Any]],
        since: list[float],
        inflight: dict[Any, tuple[int, list[int]]],
        tasks: Sequence[Any],
    ) -> None:
        """Raise `WorkerError` for an actor whose client exceeded ``client_timeout``.

        The map's caller then closes the pool, killing every actor (the stuck one too).
        """
        assert self.client_timeout is not None
        now = time.monotonic()
        for actor, calls in enumerate(queued):
            if calls and now - since[actor] >= self.client_timeout:
                head = tasks[inflight[calls[0]][1][0]]
                what = (
                    f"client {head.client_id} in round {head.round + 1}"
                    if isinstance(head, ClientTask)
                    else f"task {head!r}"
                )
                pid = self.pids[actor] if actor < len(self.pids) else "?"
                raise WorkerError(
                    f"Ray actor {actor} (pid {pid}) gave no result for {what} within "
                    f"client_timeout={self.client_timeout:g} s; it was killed and the pool closed"
                )

    def _death(
        self,
        actor: int,
        indices: list[int],
        inflight: dict[Any, tuple[int, list[int]]],
        tasks: Sequence[Any],
        exc: BaseException,
    ) -> WorkerError:
        running = [*indices, *(i for a, chunk in inflight.values() if a == actor for i in chunk)]
        what = ", ".join(
            f"client {t.client_id} in round {t.round + 1}"
            if isinstance(t, ClientTask)
            else f"task {t!r}"
            for t in (tasks[i] for i in sorted(running))
        )
        cause = type(exc).__name__
        pid = self.pids[actor] if actor < len(self.pids) else "?"
        return WorkerError(f"Ray actor {actor} (pid {pid}) died ({cause}) while running {what}")
