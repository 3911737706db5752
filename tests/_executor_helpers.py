"""Module-level (so picklable) functions for the executor tests."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from blazefl_fn.records import ClientTask, Downlink, Uplink


def square(x: int) -> int:
    return x * x


def finish_in_reverse(x: int) -> int:
    # Later tasks finish first, so completion order is the reverse of task order.
    time.sleep(0.02 * (5 - x))
    return x


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd input {x}")
    return x


class Unpicklable(Exception):
    """An exception that pickles but cannot be rebuilt (its __init__ takes two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def raise_unpicklable(x: int) -> int:
    raise Unpicklable(x, x)


def sleep_forever(x: int) -> int:
    time.sleep(3600)
    return x


def pid(_: int) -> int:
    time.sleep(0.2)
    return os.getpid()


def noisy_update(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    noise = torch.randn(4, generator=task.key.torch_generator())
    return Uplink(
        client_id=task.client_id,
        num_examples=1 + task.client_id,
        params={"w": downlink.params["w"] + data * noise, "n": torch.tensor(task.client_id)},
        metrics={"loss": data},
    )


def divide_by_zero_for_client_7(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    if task.client_id == 7:
        _ = 1 / 0
    return noisy_update(downlink, data, task)


def sigkill_for_client_2(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    if task.client_id == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return noisy_update(downlink, data, task)


def pid_update(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    """Reports which process ran the client, and on which device."""
    return Uplink(
        client_id=task.client_id,
        num_examples=1,
        params={"w": downlink.params["w"] + data},
        metrics={"pid": float(os.getpid()), "cuda": float(task.device.type == "cuda")},
    )


def fail_for_odd_clients(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    if task.client_id % 2:
        raise ValueError(f"client {task.client_id} refuses")
    return pid_update(downlink, data, task)


def sleep_forever_update(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    time.sleep(3600)
    return pid_update(downlink, data, task)


def kernel_capability(_: int) -> str:
    """The ATen CPU capability of the process that runs this (after one kernel)."""
    torch.ones(2).add(1)
    return str(torch.backends.cpu.get_cpu_capability())


def reads_stored_state(downlink: Downlink, data: object, task: ClientTask) -> Uplink:
    """A stateful client update: reads its stored state (needs a dispatch stage)."""
    kept = task.state["1.weight"]
    return Uplink(task.client_id, 1, dict(downlink.params), state={"1.weight": kept})


def nan_for_client_3(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    """Client 3's update diverges (a NaN in its parameters); the others are finite."""
    uplink = noisy_update(downlink, data, task)
    if task.client_id == 3:
        w = uplink.params["w"].clone()
        w[0] = float("nan")
        return Uplink(task.client_id, uplink.num_examples, {**uplink.params, "w": w})
    return uplink


def exits_for_client_2(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    if task.client_id == 2:
        raise SystemExit(4)
    return noisy_update(downlink, data, task)


def unsendable_for_client_1(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    """Client 1's uplink holds a lock in its metrics: a worker cannot pickle it back."""
    uplink = noisy_update(downlink, data, task)
    if task.client_id == 1:
        return Uplink(task.client_id, 1, uplink.params, metrics={"lock": threading.Lock()})  # type: ignore[dict-item]
    return uplink


def stop_self_on(x: int) -> int:
    """Task 2 stops its own worker (SIGSTOP), as a debugger or a stuck NFS read would."""
    if x == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    return x


def global_draw_update(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    """Draws from torch's global generator, which the executors' guard must refuse."""
    return Uplink(task.client_id, 1, {"w": downlink.params["w"] + torch.rand(4)})
