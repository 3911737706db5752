"""`Processes`: a long-lived pool of worker processes with shared-memory tensors.

What travels, for the `ClientJob`s that rounds map:

- once per pool and context: the client update and every client's data. Torch's
  ``file_descriptor`` sharing moves their tensors into shared memory and passes descriptors,
  so workers map the same pages instead of receiving copies. A lazy sequence of clients
  (`blazefl_fn.data.synthetic.SyntheticClients`) travels as its small record, and each worker
  makes the clients it runs;
- once per round: the downlink parameters, written into one shared broadcast buffer that every
  worker maps, plus a few hundred bytes of metadata;
- per client: a task descriptor (client id, round, key) down, with the task's own tensors
  (its message and stored state, for algorithms whose clients keep state) written into a
  shared input buffer; back, the uplink's scalars, with its parameters and new stored state
  written into a pre-allocated shared-memory slot instead of pickled. Short clients travel
  several to a message (up to `_MAX_CHUNK`, as on `Ray`), since a message and its wake-ups
  cost about what a tiny client's whole update does; slots are reused as results arrive, so
  there are as many as tasks in flight, not one per client of the round.

Shared memory comes from torch's ``file_descriptor`` strategy: each segment is unlinked as soon
as it is created and lives only while a process holds a descriptor, so nothing is left in
``/dev/shm`` even if every process is killed. Other callables are pickled once per map.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Sequence
from multiprocessing import resource_tracker, util
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from types import TracebackType
from typing import Any, TypeVar, cast

import attrs
import torch

from .._validators import check_int_at_least, check_timeout
from ..errors import WorkerError
from ..records import ClientTask, Uplink
from ..tree import TreeSpec, clone, flatten, tree_spec, unflatten
from . import _worker
from ._errors import rebuild_error
from ._placement import TaskQueues, server_device, uplink_on
from ._startup import describe_exit, main_not_importable, refuse_in_worker_import, start_failure
from .base import ClosingContext
from .devices import DeviceLike, check_devices, ensure_cublas_workspace, uses_cuda
from .jobs import ClientContext, ClientJob

__all__ = [
    "Processes",
]

T = TypeVar("T")
R = TypeVar("R")

# Messages kept in flight per worker: the second hides the round trip of the first's results.
_DEPTH = 2
# Tasks per message: at most _MAX_CHUNK (as `Ray`'s calls), and the tasks still unsent over
# workers x _MESSAGES_PER_WORKER, so messages shrink towards the end of a map (guided
# self-scheduling) and no worker idles while another finishes a long last message.
_MAX_CHUNK = 32
_MESSAGES_PER_WORKER = 8
_START_METHODS = ("spawn", "forkserver")


class _NotPicklable(Exception):
    """Raised inside the pool when work cannot be pickled; `map` turns it into TypeError."""


@attrs.define
class _Worker:
    process: BaseProcess
    conn: Connection
    inflight: deque[int] = attrs.field(factory=lambda: deque[int]())
    messages: int = 0  # messages sent whose replies have not arrived
    # When the task at the head of ``inflight`` began running (the previous reply's arrival).
    since: float = 0.0


def _stop(workers: list[_Worker], graceful: bool) -> None:
    if graceful:
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("stop",))
        for worker in workers:
            worker.process.join(timeout=10)
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    workers.clear()


@contextlib.contextmanager
def _sigint_held() -> Generator[None]:
    """Hold a Ctrl-C (and a SIGTERM) back while workers are started; deliver it once they are.

    A Ctrl-C reaches the whole process group: a worker still importing torch would die of it
    with a traceback before its own handler is set, so workers are born with SIGINT (and
    SIGTERM) blocked (the mask survives exec; `_worker.main` unblocks them). In this process
    neither must land inside ``Process.start()``, between launching a worker and handing it
    its start-up data (the worker would fail reading it): they are recorded, and delivered
    again after the block, to this process's own handlers, when every started worker can be
    stopped. Handlers can only be set from the main thread; other threads get the mask alone.
    """
    caught: list[int] = []
    held = {signal.SIGINT, signal.SIGTERM}
    main = threading.current_thread() is threading.main_thread()
    handlers = (
        {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in held}
        if main
        else {}
    )
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # held signals reach the handlers now
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)


class Processes(ClosingContext):
    """Maps tasks over a pool of ``workers`` long-lived processes.

    Args:
        workers: worker processes (>= 1), started at construction (which returns once all
            of them are ready) and reused for every map.
        threads: torch intra-op threads in each worker (>= 1; default 1, as on every
            executor); the server's side of each round runs at the same count
            (`blazefl_fn.round.run_round`), so every executor given it computes the same bits.
        start_method: ``"spawn"`` (default) or ``"forkserver"``; plain fork is never used,
            because forking a process whose torch thread pools are running can hang (or
            whose CUDA context is live).
        client_timeout: seconds a worker may take over one client (None: no limit). A worker
            that exceeds it (stuck, stopped with SIGSTOP, deadlocked) is killed and the map
            raises `WorkerError` naming the client and round.
        devices: where clients train; client ``k`` on ``devices[k % len(devices)]``. Every
            worker owns its devices (with at least as many devices as workers they are dealt
            out; otherwise worker ``w`` owns device ``w % len(devices)``) and runs only the
            clients of those devices, so each client's data reaches one worker's device once,
            and the parent holds no CUDA context unless the server's parameters are on CUDA.

    Functions mapped must be picklable (module-level functions or records, not lambdas), and
    scripts that use this executor need the usual ``if __name__ == "__main__":`` guard.

    Raises:
        ValueError: a bad argument.

    Examples:
        >>> import operator, functools
        >>> with Processes(2) as ex:
        ...     ex.map(functools.partial(operator.mul, 3), [1, 2, 3])
        [3, 6, 9]
    """

    def __init__(
        self,
        workers: int,
        *,
        threads: int = 1,
        start_method: str = "spawn",
        devices: Sequence[DeviceLike] = ("cpu",),
        client_timeout: float | None = None,
    ) -> None:
        # Inside a worker still importing an unguarded main module: exit before starting more.
        refuse_in_worker_import()
        check_int_at_least("workers", workers, 1)
        check_int_at_least("threads", threads, 1)
        self.client_timeout = check_timeout("client_timeout", client_timeout)
        if start_method not in _START_METHODS:
            raise ValueError(
                f"start_method must be one of {list(_START_METHODS)}, got {start_method!r}"
            )
        self.workers = workers
        self.threads = threads
        self.devices = check_devices(devices)
        if (reason := main_not_importable()) is not None:
            raise WorkerError(reason)
        if uses_cuda(self.devices):
            # Inherited by the workers, which start CUDA; the parent itself need not.
            ensure_cublas_workspace()
        # How many times a client context was sent to a worker (once per worker per context).
        self.context_sends = 0
        self._workers: list[_Worker] = []
        self._contexts: dict[tuple[int, int, bool, bool], tuple[int, ClientContext[Any]]] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        # The layout of the bound map's downlink parameters (None: not a `ClientJob` map).
        self._bound: TreeSpec | None = None
        # The largest uplink (parameters + stored state) seen that did not fit its slot.
        self._result_bytes = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop, self._workers, False)
        context = (
            mp.get_context("spawn") if start_method == "spawn" else mp.get_context("forkserver")
        )
        try:
            # Started here, not inside the first `process.start()`: launching it unblocks
            # SIGINT in this thread, which would undo `_sigint_held` for the first worker.
            resource_tracker.ensure_running()
            # multiprocessing's temporary directory (pymp-*, for sharing descriptors), made
            # before the workers: they inherit it instead of making one each, which a worker
            # killed with SIGKILL would leave behind. This process removes it when it exits.
            util.get_temp_dir()
            with _sigint_held():
                for i in range(workers):
                    parent_end, child_end = context.Pipe(duplex=True)
                    process = context.Process(
                        target=_worker.main,
                        args=(child_end, threads, tuple(str(d) for d in self.devices)),
                        name=f"blazefl-fn-worker-{i}",
                        daemon=True,
                    )
                    process.start()
                    child_end.close()
                    self._workers.append(_Worker(process, parent_end))
            self._await_ready()
        except BaseException:
            self._shutdown(graceful=False)
            raise

    # -- public --------------------------------------------------------------------------------

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``, spread over the workers, in task order.

        Raises:
            ClientError: a client job failed (the first in task order); the original
                exception is chained, and its traceback from the worker chained below it.
                The pool stays usable.
            WorkerError: a worker process died; the pool is closed.
            TypeError: ``fn`` cannot be pickled.
            RuntimeError: the executor is closed.
        """
        if self._closed:
            raise RuntimeError("this Processes executor is closed")
        if not tasks:
            return []
        try:
            slot_bytes, sends = self._bind(fn, tasks)
            results, failure = self._run(tasks, sends, slot_bytes)
            if failure is None and isinstance(fn, ClientJob):
                results = _to_server(results, server_device(cast(ClientJob[Any], fn)))
        except _NotPicklable as exc:
            # Found before anything was written to a worker: the pool is still consistent.
            raise TypeError(str(exc)) from exc.__cause__
        except BaseException:
            # Interrupted, or a worker died: no worker may outlive the failure.
            self._shutdown(graceful=False)
            raise
        if failure is not None:
            raise failure
        return results

    def prepare(self, context: ClientContext[Any]) -> None:
        """Send ``context`` (the client update and every client's data) to the workers now.

        Otherwise the first map that uses it sends it, and that round pays for moving the
        client data into shared memory; `make_round` calls this so the cost lands before the
        round loop. Sending is done once per pool and context either way.

        Raises:
            TypeError: the context cannot be pickled.
            WorkerError: a worker process died; the pool is closed.
            RuntimeError: the executor is closed.
        """
        if self._closed:
            raise RuntimeError("this Processes executor is closed")
        try:
            self._context_key(context)
        except _NotPicklable as exc:
            raise TypeError(str(exc)) from exc.__cause__
        except BaseException:
            self._shutdown(graceful=False)
            raise

    def close(self) -> None:
        """Stop the workers and release the shared buffers; idempotent."""
        self._shutdown(graceful=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shutdown(graceful=exc_type is None)

    def __repr__(self) -> str:
        where = (
            ""
            if self.devices == (torch.device("cpu"),)
            else f", devices={list(map(str, self.devices))}"
        )
        return f"Processes({self.workers}, threads={self.threads}{where})"

    # -- internals -----------------------------------------------------------------------------

    def _shutdown(self, graceful: bool) -> None:
        self._closed = True
        _stop(self._workers, graceful)
        self._contexts.clear()
        self._buffers.clear()
        self._finalizer.detach()

    def _await_ready(self) -> None:
        """Block until every worker has started (imported torch, set its threads).

        Raises:
            WorkerError: a worker died first, with the reason in one line (`start_failure`).
        """
        waiting = {id(w.conn): w for w in self._workers}
        sentinels = {w.process.sentinel: w for w in self._workers}
        while waiting:
            for ready in wait([*(w.conn for w in waiting.values()), *sentinels]):
                if isinstance(ready, int):
                    worker = sentinels[ready]
                    if id(worker.conn) in waiting and not worker.conn.poll():
                        raise WorkerError(start_failure(worker.process))
                    continue
                assert isinstance(ready, Connection)
                try:
                    reply = ready.recv()
                except (EOFError, OSError):
                    raise WorkerError(start_failure(waiting[id(ready)].process)) from None
                assert reply[0] == "ready"
                waiting.pop(id(ready))

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        """Send ``message`` to every worker, pickled for each (tensor handles are one-shot).

        Raises:
            _NotPicklable: ``message`` cannot be pickled; found on the first worker, before
                anything was written, so the pool stays consistent.
            WorkerError: a worker is gone.
        """
        for worker in self._workers:
            try:
                payload = ForkingPickler.dumps(message)
            except (AttributeError, TypeError, ValueError, pickle.PicklingError) as exc:
                raise _NotPicklable(
                    f"Processes needs picklable work (module-level functions or records, "
                    f"not lambdas or closures): {exc}"
                ) from exc
            self._send(worker, payload)

    def _send(self, worker: _Worker, payload: bytes | memoryview) -> None:
        try:
            worker.conn.send_bytes(payload)
        except OSError as exc:
            raise WorkerError(
                f"worker process {worker.process.pid} {describe_exit(worker.process)}"
            ) from exc

    def _shared_buffer(self, name: str, nbytes: int) -> torch.Tensor:
        """A shared uint8 buffer of at least ``nbytes`` that every worker has mapped."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            # Grow geometrically so that slowly growing rounds do not reallocate every time.
            size = max(nbytes, 2 * buffer.numel() if buffer is not None else 0, 64)
            buffer = torch.empty(size, dtype=torch.uint8)
            buffer.share_memory_()  # pyright: ignore[reportUnknownMemberType]  # untyped in torch
            self._buffers[name] = buffer
            self._broadcast(("buffer", name, buffer))
        return buffer

    def _context_key(self, context: ClientContext[Any]) -> int:
        # Keyed by the identity of what a context holds, so a new ClientContext wrapping the
        # same update and data (one per round) is not sent again.
        identity = (
            id(context.client_update),
            id(context.clients),
            context.dispatched,
            context.check_global_rng,
        )
        known = self._contexts.get(identity)
        if known is None:
            known = (len(self._contexts), context)
            self._broadcast(("context", known[0], context))
            self._contexts[identity] = known
            self.context_sends += len(self._workers)
        return known[0]

    def _bind(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any]
    ) -> tuple[int, list[tuple[Any, ...]]]:
        """Tell every worker what this map runs.

        Returns:
            The result slot size in bytes, and for each task what to send (the task, and where
            its own tensors lie in the input buffer, if anywhere).
        """
        if isinstance(fn, ClientJob):
            job = cast(ClientJob[Any], fn)
            key = self._context_key(job.context)
            spec = tree_spec(job.downlink.params)
            broadcast = self._shared_buffer("broadcast", spec.nbytes)
            flatten(job.downlink.params, out=broadcast)
            sends, input_bytes = self._stage_inputs(tasks)
            # An uplink is usually the size of the downlink plus the state the client got.
            slot_bytes = max(spec.nbytes + input_bytes, self._result_bytes)
            self._shared_buffer("slots", max(slot_bytes * self._slot_count(len(tasks)), 1))
            meta = attrs.evolve(job.downlink, params={})
            self._broadcast(("bind_job", key, meta, spec, slot_bytes))
            self._bound = spec
            return slot_bytes, sends
        self._broadcast(("bind_fn", fn))
        self._bound = None
        return 0, [("task", i, task, None) for i, task in enumerate(tasks)]

    def _stage_inputs(self, tasks: Sequence[Any]) -> tuple[list[tuple[Any, ...]], int]:
        """Write each `ClientTask`'s message and state into the shared input buffer.

        Returns:
            The messages to send, and the largest input of one task in bytes.
        """
        layouts: list[tuple[int, TreeSpec, TreeSpec] | None] = []
        total = largest = 0
        for task in tasks:
            if isinstance(task, ClientTask) and (task.message or task.state):
                message, state = tree_spec(task.message), tree_spec(task.state)
                layouts.append((total, message, state))
                size = message.nbytes + state.nbytes
                total += size
                largest = max(largest, size)
            else:
                layouts.append(None)
        if total == 0:
            return [("task", i, task, None) for i, task in enumerate(tasks)], 0
        buffer = self._shared_buffer("inputs", total)
        sends: list[tuple[Any, ...]] = []
        for i, (task, layout) in enumerate(zip(tasks, layouts, strict=True)):
            if layout is None:
                sends.append(("task", i, task, None))
                continue
            start, message, state = layout
            flatten(task.message, out=buffer[start : start + message.nbytes])
            end = start + message.nbytes + state.nbytes
            flatten(task.state, out=buffer[start + message.nbytes : end])
            sends.append(("task", i, attrs.evolve(task, message={}, state={}), layout))
        return sends, largest

    def _chunk(self, tasks: int) -> int:
        """Tasks per message in a map of ``tasks`` (1 with ``client_timeout``: each timed alone)."""
        if self.client_timeout is not None:
            return 1
        return max(1, min(_MAX_CHUNK, tasks // (len(self._workers) * _MESSAGES_PER_WORKER)))

    def _slot_count(self, tasks: int) -> int:
        """Result slots a map of ``tasks`` needs: one per task that can be in flight at once."""
        return min(tasks, len(self._workers) * _DEPTH * self._chunk(tasks))

    def _run(
        self, tasks: Sequence[Any], sends: list[tuple[Any, ...]], slot_bytes: int
    ) -> tuple[list[Any], BaseException | None]:
        """Results in task order and the first task failure in task order, if any."""
        queues = TaskQueues(tasks, len(self._workers), len(self.devices), uses_cuda(self.devices))
        results: list[Any] = [None] * len(tasks)
        failures: dict[int, BaseException] = {}
        number = {id(w.conn): i for i, w in enumerate(self._workers)}
        free = deque(range(self._slot_count(len(tasks))))
        slot_of: dict[int, int] = {}
        unsent = [len(tasks)]

        def feed(worker: _Worker) -> None:
            while not failures and worker.messages < _DEPTH:
                # Sized by the tasks still unsent, so messages shrink towards the end of the
                # map and no worker idles while another works through a long last message.
                chunk = self._chunk(unsent[0])
                batch: list[tuple[Any, ...]] = []
                while len(batch) < chunk:
                    index = queues.take(number[id(worker.conn)])
                    if index is None:
                        break
                    slot_of[index] = free.popleft()
                    unsent[0] -= 1
                    batch.append((*sends[index], slot_of[index]))
                if not batch:
                    return
                if not worker.inflight:
                    worker.since = time.monotonic()
                worker.inflight.extend(b[1] for b in batch)
                worker.messages += 1
                message = batch[0] if len(batch) == 1 else ("tasks", batch)
                self._send(worker, ForkingPickler.dumps(message))

        for worker in self._workers:
            feed(worker)
        by_conn = {id(w.conn): w for w in self._workers}
        by_sentinel = {w.process.sentinel: w for w in self._workers}
        while any(w.inflight for w in self._workers):
            busy = [w.conn for w in self._workers if w.inflight]
            ready_list = wait([*busy, *by_sentinel], timeout=self._patience())
            if not ready_list:
                self._check_stuck(tasks)
            for ready in ready_list:
                if isinstance(ready, int):
                    worker = by_sentinel[ready]
                    if worker.inflight or not worker.conn.poll():
                        raise self._death(worker, tasks)
                    continue
                assert isinstance(ready, Connection)
                worker = by_conn[id(ready)]
                try:
                    message = ready.recv()
                except (EOFError, OSError):
                    worker.process.join(timeout=5)
                    raise self._death(worker, tasks) from None
                worker.messages -= 1
                for reply in message[1] if message[0] == "replies" else [message]:
                    index = reply[1]
                    worker.inflight.remove(index)
                    if reply[0] == "ok":
                        results[index] = self._result(reply, slot_of[index] * slot_bytes)
                    else:
                        failures[index] = rebuild_error(reply)
                    free.append(slot_of.pop(index))  # read out: the slot can be reused
                worker.since = time.monotonic()
                feed(worker)
        return results, failures[min(failures)] if failures else None

    def _result(self, reply: tuple[Any, ...], start: int) -> Any:
        _, _, result, specs = reply
        if specs is None:
            if isinstance(result, Uplink):
                # It did not fit its slot: make the next map's slots big enough.
                size = tree_spec(result.params).nbytes + tree_spec(result.state).nbytes
                self._result_bytes = max(self._result_bytes, size)
            return result
        params_spec = _worker.spec_of(specs[0], self._bound)
        state_spec = _worker.spec_of(specs[1], self._bound)
        middle = start + params_spec.nbytes
        slots = self._buffers["slots"]
        # Copied out of the slot, which the next task's result overwrites: the parameters in
        # one copy (their own buffer, viewed per entry; one copy per entry cost ~0.3 ms per
        # small client), the stored state entry by entry (it may be kept for many rounds).
        params = unflatten(slots[start:middle].clone(), params_spec)
        state = (
            clone(unflatten(slots[middle : middle + state_spec.nbytes], state_spec))
            if state_spec.names
            else {}
        )
        return attrs.evolve(result, params=params, state=state)

    def _patience(self) -> float | None:
        """Seconds until the longest-running client reaches ``client_timeout`` (None: none)."""
        if self.client_timeout is None:
            return None
        starts = [w.since for w in self._workers if w.inflight]
        return max(0.0, min(starts) + self.client_timeout - time.monotonic())

    def _check_stuck(self, tasks: Sequence[Any]) -> None:
        """Kill a worker whose client exceeded ``client_timeout`` and raise `WorkerError`."""
        assert self.client_timeout is not None
        now = time.monotonic()
        for worker in self._workers:
            if worker.inflight and now - worker.since >= self.client_timeout:
                # SIGKILL: a stopped (SIGSTOP) process would not act on SIGTERM.
                worker.process.kill()
                worker.process.join(timeout=5)
                head = tasks[worker.inflight[0]]
                what = (
                    f"client {head.client_id} in round {head.round + 1}"
                    if isinstance(head, ClientTask)
                    else f"task {head!r}"
                )
                raise WorkerError(
                    f"worker process {worker.process.pid} gave no result for {what} within "
                    f"client_timeout={self.client_timeout:g} s; it was killed and the pool closed"
                )

    def _death(self, worker: _Worker, tasks: Sequence[Any]) -> WorkerError:
        # `describe_exit` reaps the process first: the sentinel can fire before that.
        running = [tasks[i] for i in worker.inflight]
        what = ", ".join(
            f"client {t.client_id} in round {t.round + 1}"
            if isinstance(t, ClientTask)
            else f"task {t!r}"
            for t in running
        )
        pid = worker.process.pid
        message = f"worker process {pid} {describe_exit(worker.process)}"
        return WorkerError(f"{message} while running {what}" if what else message)


def _to_server(results: list[Any], device: torch.device) -> list[Any]:
    """Uplinks (which come back through CPU shared memory) on the server's ``device``."""
    if device.type == "cpu":
        return results
    return [uplink_on(r, device) if isinstance(r, Uplink) else r for r in results]
