"""Module-level (so picklable) client updates for tests/test_processes_inputs.py."""

from __future__ import annotations

import torch

from blazefl_fn.records import ClientTask, Downlink, Uplink

# Elements in the extra state `grow_update` returns: far more than any task's input.
GROWN = 50_000


def doubled(tensor: torch.Tensor) -> torch.Tensor:
    """``2 * tensor`` in the tensor's own dtype (uint8 wraps); bools pass through."""
    return tensor.clone() if tensor.dtype == torch.bool else tensor * 2


def bumped(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor + 1`` in the tensor's own dtype (uint8 wraps); bools are negated."""
    return ~tensor if tensor.dtype == torch.bool else tensor + 1


def echo_update(downlink: Downlink, data: int, task: ClientTask) -> Uplink:
    """Sends back ``2 * message`` (plus the downlink shifted by ``data``); keeps ``state + 1``."""
    params = {f"up.{name}": doubled(t) for name, t in task.message.items()}
    params["w"] = downlink.params["w"] + data
    return Uplink(
        client_id=task.client_id,
        num_examples=1 + task.client_id,
        params=params,
        metrics={"loss": float(data)},
        state={name: bumped(t) for name, t in task.state.items()},
    )


def grow_update(downlink: Downlink, data: int, task: ClientTask) -> Uplink:
    """Passes the message and state back as they arrived (views of the shared input buffer in a
    worker) and adds a state entry far larger than the input."""
    state = dict(task.state)
    start = float(task.client_id * GROWN)
    state["grown"] = torch.arange(start, start + GROWN, dtype=torch.float32)
    return Uplink(
        client_id=task.client_id,
        num_examples=1,
        params={**task.message, "w": downlink.params["w"] + data},
        state=state,
    )
