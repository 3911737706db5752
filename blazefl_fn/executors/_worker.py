"""The loop a `Processes` worker runs: receive context, buffers and tasks; write results.

Messages from the parent (tuples, first item the kind):

- ``("context", key, ClientContext)`` — the static part of client jobs, once per pool;
- ``("buffer", name, tensor)`` — a shared-memory buffer (``"broadcast"``, ``"inputs"`` or
  ``"slots"``);
- ``("bind_job", key, downlink_without_params, spec, slot_bytes)`` — this map runs
  `ClientJob`s whose downlink parameters lie in the broadcast buffer with layout ``spec``;
- ``("bind_fn", fn)`` — this map runs an arbitrary picklable ``fn``;
- ``("task", index, task, layout)`` where ``layout`` is None, or ``(offset, message_spec,
  state_spec)`` when the task's message and state lie in the input buffer from ``offset``;
- ``("stop",)``.

Replies: ``("ready", pid)`` once at start; ``("ok", index, result, specs)`` where ``specs``
is ``(params_spec, state_spec)`` when the uplink's parameters and stored state were written
into slot ``index`` instead of being pickled, else None; and
``("err", index, client_id, round, pickled_cause, summary, traceback_text)``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import attrs
import torch

from ..devices import cuda_determinism
from ..jobs import ClientContext, ClientJob, ClientTask
from ..records import Downlink, Uplink
from ..tree import TreeSpec, clone, flatten, tree_spec, unflatten
from ._errors import error_reply
from ._placement import Placement, placed


def main(conn: Connection, threads: int, devices: tuple[str, ...] = ("cpu",)) -> None:
    """Serve the parent until it says stop or goes away.

    Client jobs run on ``devices`` (client ``k`` on ``devices[k % len(devices)]``); the parent
    sends this worker only clients of the devices it owns.
    """
    # Ctrl-C reaches the whole process group; the parent decides what happens to the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    placement = Placement(tuple(torch.device(d) for d in devices))
    conn.send(("ready", os.getpid()))
    # This process does nothing but client work: deterministic kernels for its lifetime.
    with cuda_determinism(placement.cuda):
        _serve(conn, placement)


def _serve(conn: Connection, placement: Placement) -> None:
    contexts: dict[int, ClientContext[Any]] = {}
    buffers: dict[str, torch.Tensor] = {}
    fn: Callable[[Any], Any] | None = None
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
            _, key, meta, spec, slot_bytes = message
            assert isinstance(meta, Downlink)
            assert isinstance(spec, TreeSpec)
            params = unflatten(buffers["broadcast"][: spec.nbytes], spec)
            fn = placed(placement, ClientJob(contexts[key], attrs.evolve(meta, params=params)))
        elif kind == "bind_fn":
            fn, slot_bytes = message[1], 0
        elif kind == "task":
            _, index, task, layout = message
            assert fn is not None
            if layout is not None:
                task = _with_inputs(task, buffers["inputs"], layout)
            try:
                result = fn(task)
            except Exception as exc:
                conn.send(error_reply(index, exc))
                continue
            conn.send(_ok_reply(index, result, buffers.get("slots"), slot_bytes))


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
    index: int, result: object, slots: torch.Tensor | None, slot_bytes: int
) -> tuple[Any, ...]:
    if isinstance(result, Uplink) and slots is not None and slot_bytes > 0:
        params_spec, state_spec = tree_spec(result.params), tree_spec(result.state)
        if params_spec.nbytes + state_spec.nbytes <= slot_bytes:
            start = index * slot_bytes
            middle = start + params_spec.nbytes
            flatten(result.params, out=slots[start:middle])
            flatten(result.state, out=slots[middle : middle + state_spec.nbytes])
            return (
                "ok",
                index,
                attrs.evolve(result, params={}, state={}),
                (params_spec, state_spec),
            )
        # Too big for its slot: pickle it (torch moves the tensors to new shared memory). Copies,
        # because a tensor passed through from the task views the input buffer, which the
        # next map overwrites.
        result = attrs.evolve(result, params=clone(result.params), state=clone(result.state))
    return ("ok", index, result, None)
