"""The loop a `Processes` worker runs: receive context, buffers and tasks; write results.

Messages from the parent (tuples, first item the kind):

- ``("context", key, ClientContext)`` — the static part of client jobs, once per pool;
- ``("buffer", name, tensor)`` — a shared-memory buffer (``"broadcast"``, ``"inputs"`` or
  ``"slots"``);
- ``("bind_job", key, downlink_without_params, spec, slot_bytes)`` — this map runs
  `ClientJob`s whose downlink parameters lie in the broadcast buffer with layout ``spec``;
- ``("bind_fn", fn)`` — this map runs an arbitrary picklable ``fn``;
- ``("task", index, task, layout, slot)`` where ``layout`` is None, or ``(offset,
  message_spec, state_spec)`` when the task's message and state lie in the input buffer from
  ``offset``, and ``slot`` is the result slot to write the uplink into;
- ``("tasks", [(kind, index, task, layout, slot), ...])`` — several tasks, answered by one
  ``("replies", [reply, ...])`` in the same order;
- ``("stop",)``.

Replies: ``("ready", pid)`` once at start; ``("ok", index, result,
specs)`` where ``specs`` is ``(params_layout, state_layout)`` when the uplink's parameters and
stored state were written into the task's slot instead of being pickled, else None; a layout
is `SAME` (the layout of the bound downlink's parameters, which the parent sent), `EMPTY` (no
entries) or, for any other tree, its `TreeSpec` (so a small client's reply pickles no spec);
and ``("err", index, client_id, round, pickled_cause, summary, traceback_text)``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import attrs
import torch

from ..errors import ClientError
from ..records import ClientTask, Downlink, Uplink
from ..tree import TreeSpec, clone, flatten, tree_spec, unflatten
from ._errors import error_reply
from ._placement import Placement, placed
from .devices import cuda_determinism
from .jobs import ClientContext, ClientJob

# A result tree's layout in a reply, when it is not sent as its `TreeSpec`.
SAME = 0  # the layout of the bound downlink's parameters
EMPTY = 1  # no entries
_EMPTY_SPEC = tree_spec({})


def layout_of(spec: TreeSpec, bound: TreeSpec | None) -> TreeSpec | int:
    """``spec`` as a reply carries it: `SAME`, `EMPTY` or the spec itself."""
    if spec == bound:
        return SAME
    return EMPTY if spec == _EMPTY_SPEC else spec


def spec_of(layout: TreeSpec | int, bound: TreeSpec | None) -> TreeSpec:
    """Inverse of `layout_of`."""
    if isinstance(layout, TreeSpec):
        return layout
    if layout == EMPTY:
        return _EMPTY_SPEC
    assert bound is not None
    return bound


def main(conn: Connection, threads: int, devices: tuple[str, ...] = ("cpu",)) -> None:
    """Serve the parent until it says stop or goes away.

    Client jobs run on ``devices`` (client ``k`` on ``devices[k % len(devices)]``); the parent
    sends this worker only clients of the devices it owns.
    """
    # Ctrl-C reaches the whole process group; the parent decides what happens to the pool.
    # The parent started this process with SIGINT blocked (`processes._sigint_held`), so a
    # Ctrl-C during start-up is still pending: ignoring before unblocking discards it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _die_with_parent()
    torch.set_num_threads(threads)
    placement = Placement(tuple(torch.device(d) for d in devices))
    try:
        conn.send(("ready", os.getpid()))
        # This process does nothing but client work: deterministic kernels for its lifetime.
        with cuda_determinism(placement.cuda):
            _serve(conn, placement)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: nobody is left to tell, so exit without a traceback


def _die_with_parent(interval: float = 0.25) -> None:
    """Exit, silently, within ``interval`` seconds of the parent's death, even mid-client.

    Otherwise a worker busy with a client notices only when it next talks to the pipe. A
    polling thread rather than Linux's ``PR_SET_PDEATHSIG``, which fires when the parent
    *thread* that started the worker ends, and a pool may be made in a short-lived thread.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:  # re-parented: the parent is gone
                os._exit(0)

    threading.Thread(target=watch, name="blazefl_fn-parent-watch", daemon=True).start()


def _serve(conn: Connection, placement: Placement) -> None:
    contexts: dict[int, ClientContext[Any]] = {}
    buffers: dict[str, torch.Tensor] = {}
    fn: Callable[[Any], Any] | None = None
    bound: TreeSpec | None = None
    slot_bytes = 0
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        kind = message[0]
        if kind == "stop":
            return
        if kind == "context":
            contexts[message[1]] = message[2]
        elif kind == "buffer":
            buffers[message[1]] = message[2]
        elif kind == "bind_job":
            _, key, meta, bound, slot_bytes = message
            assert isinstance(meta, Downlink)
            assert isinstance(bound, TreeSpec)
            params = unflatten(buffers["broadcast"][: bound.nbytes], bound)
            fn = placed(placement, ClientJob(contexts[key], attrs.evolve(meta, params=params)))
        elif kind == "bind_fn":
            fn, bound, slot_bytes = message[1], None, 0
        elif kind == "task":
            assert fn is not None
            _reply(conn, [_run_task(fn, message, buffers, slot_bytes, bound)], batched=False)
        elif kind == "tasks":
            assert fn is not None
            replies = [_run_task(fn, m, buffers, slot_bytes, bound) for m in message[1]]
            _reply(conn, replies, batched=True)


def _run_task(
    fn: Callable[[Any], Any],
    message: tuple[Any, ...],
    buffers: dict[str, torch.Tensor],
    slot_bytes: int,
    bound: TreeSpec | None,
) -> tuple[tuple[Any, ...], object]:
    """Run one ``("task", ...)`` message: its reply, and its task (to name it in errors)."""
    _, index, task, layout, slot = message
    if layout is not None:
        task = _with_inputs(task, buffers["inputs"], layout)
    try:
        result = fn(task)
    except Exception as exc:
        return error_reply(index, exc), task
    slots = buffers.get("slots")
    return _ok_reply(index, result, slots, slot * slot_bytes, slot_bytes, bound), task


def _reply(
    conn: Connection, replies: list[tuple[tuple[Any, ...], object]], *, batched: bool
) -> None:
    """Send ``replies`` (one message); a result that cannot be pickled becomes its error."""
    sent = [reply for reply, _ in replies]
    try:
        # Pickled whole before anything is written, so a failure sends nothing.
        conn.send(("replies", sent) if batched else sent[0])
        return
    except (BrokenPipeError, ConnectionResetError):
        raise
    except Exception:
        pass
    checked: list[tuple[Any, ...]] = []
    for reply, task in replies:
        try:
            ForkingPickler.dumps(reply)
            checked.append(reply)
        except Exception as exc:
            checked.append(error_reply(reply[1], _unsendable(task, exc)))
    conn.send(("replies", checked) if batched else checked[0])


def _unsendable(task: object, exc: Exception) -> Exception:
    """The error for a result that cannot be pickled back to the parent."""
    cause = TypeError(
        f"its result cannot be sent back to the driver ({type(exc).__name__}: {exc}); "
        "uplinks must hold tensors and plain values"
    )
    if isinstance(task, ClientTask):
        error = ClientError(task.client_id, task.round, cause)
        error.__cause__ = cause
        return error
    return cause


def _with_inputs(
    task: ClientTask, inputs: torch.Tensor, layout: tuple[int, TreeSpec, TreeSpec]
) -> ClientTask:
    """``task`` with its message and state as views into the shared input buffer."""
    start, message_spec, state_spec = layout
    middle = start + message_spec.nbytes
    return attrs.evolve(
        task,
        message=unflatten(inputs[start:middle], message_spec),
        state=unflatten(inputs[middle : middle + state_spec.nbytes], state_spec),
    )


def _ok_reply(
    index: int,
    result: object,
    slots: torch.Tensor | None,
    start: int,
    slot_bytes: int,
    bound: TreeSpec | None,
) -> tuple[Any, ...]:
    if isinstance(result, Uplink) and slots is not None and slot_bytes > 0:
        params_spec, state_spec = tree_spec(result.params), tree_spec(result.state)
        if params_spec.nbytes + state_spec.nbytes <= slot_bytes:
            middle = start + params_spec.nbytes
            flatten(result.params, out=slots[start:middle])
            if state_spec.names:
                flatten(result.state, out=slots[middle : middle + state_spec.nbytes])
            return (
                "ok",
                index,
                attrs.evolve(result, params={}, state={}),
                (layout_of(params_spec, bound), layout_of(state_spec, bound)),
            )
        # Too big for its slot: pickle it (torch moves the tensors to new shared memory). Copies,
        # because a tensor passed through from the task views the input buffer, which the
        # next map overwrites.
        result = attrs.evolve(result, params=clone(result.params), state=clone(result.state))
    return ("ok", index, result, None)
