"""Stress for the thread executor without relying on the GIL: many short rounds of many tiny
clients on more threads than cores (8, or twice the cores), repeated, must give the sequential
bits and never raise; the shared state that threads touch (working copies, device placement,
the client-state store's budget) keeps its invariants when threads reach it at once.

`make test-ft` runs this file on a free-threaded CPython with the GIL off (see the guide's
"Free-threaded Python"); the main suite runs it under the GIL.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import blazefl_fn as fl
from blazefl_fn.client._module_copy import working_copy
from blazefl_fn.data.datasets import TensorDataset
from blazefl_fn.executors._placement import PlacedJob, Placement
from blazefl_fn.executors.jobs import ClientContext, ClientJob
from blazefl_fn.models import intra_op_threads

KEY = fl.Key.from_seed(22)
NUM_CLIENTS = 96
PER_ROUND = 48
ROUNDS = 12
REPEATS = 2


def _clients() -> list[fl.ClientData]:
    g = torch.Generator().manual_seed(22)
    base = TensorDataset(torch.randn(3 * NUM_CLIENTS, 4, generator=g),
                         torch.randint(0, 2, (3 * NUM_CLIENTS,), generator=g))  # fmt: skip
    return [fl.ClientData(base, torch.arange(3 * k, 3 * k + 3)) for k in range(NUM_CLIENTS)]


CLIENTS = _clients()
LOCAL = fl.LocalSGD(epochs=2, batch_size=2, lr=0.1)


def _net() -> nn.Module:
    # Keyed dropout: each client's draws come from its own key, whichever thread runs it.
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), fl.KeyedDropout(0.25), nn.Linear(8, 2))


ALGORITHMS: dict[str, Callable[[], fl.Algorithm[fl.ClientData, object]]] = {
    "fedavg": lambda: fl.fedavg(
        _net, num_clients=NUM_CLIENTS, clients_per_round=PER_ROUND, local=LOCAL
    ),
    # Stateful: every round reads and writes per-client variates in the client-state store.
    "scaffold": lambda: fl.scaffold(
        _net, num_clients=NUM_CLIENTS, clients_per_round=PER_ROUND, local=LOCAL
    ),
}


def _digest(algorithm: str, executor: fl.Executor) -> str:
    algo = ALGORITHMS[algorithm]()
    with executor, intra_op_threads(1):
        state, _ = fl.run_rounds(
            fl.make_round(algo, CLIENTS, executor), algo.init(KEY), KEY, until=ROUNDS
        )
    return fl.tree.digest(state.params)


# More threads than cores, here and on a 16-core machine alike.
MANY = max(8, 2 * (os.cpu_count() or 1))
EXECUTORS: dict[str, Callable[[], fl.Executor]] = {
    "threads4": lambda: fl.Threads(4),
    "threads-many": lambda: fl.Threads(MANY),
    # A device list (the CPU three times) sends every client through the locked placement.
    "threads-many-placed": lambda: fl.Threads(MANY, devices=["cpu", "cpu", "cpu"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_many_tiny_rounds_on_more_threads_than_cores_give_the_sequential_bits(
    algorithm: str,
) -> None:
    expected = _digest(algorithm, fl.Sequential())
    seen = {
        (name, repeat): _digest(algorithm, make())
        for name, make in EXECUTORS.items()
        for repeat in range(REPEATS)
    }
    assert set(seen.values()) == {expected}, seen


def test_each_thread_gets_its_own_working_copies_and_keeps_them() -> None:
    templates = [nn.Linear(3, 3) for _ in range(4)]
    start = threading.Barrier(8)

    def grab(_: int) -> list[list[int]]:
        start.wait()  # every thread asks at once
        return [[id(working_copy(t)) for t in templates] for _ in range(50)]

    with ThreadPoolExecutor(8) as pool:
        per_thread = list(pool.map(grab, range(8)))
    firsts = [calls[0] for calls in per_thread]
    for calls in per_thread:
        assert all(ids == calls[0] for ids in calls)  # reused within a thread
    all_ids = [i for ids in firsts for i in ids]
    assert len(set(all_ids)) == len(all_ids)  # never shared across threads or templates
    assert not {id(t) for t in templates} & set(all_ids)  # never the template itself


class _SlowToPlace:
    """Client data whose move to a device is slow and counted (a `Placeable`)."""

    def __init__(self, moves: Counter[int], lock: threading.Lock, ident: int) -> None:
        self.moves, self.lock, self.ident = moves, lock, ident

    def to_device(self, device: torch.device) -> _SlowToPlace:
        with self.lock:
            self.moves[self.ident] += 1
        time.sleep(0.005)  # widens the window in which a second reader could start a move
        return self


def test_threads_reading_the_same_clients_at_once_place_each_once() -> None:
    moves: Counter[int] = Counter()
    lock = threading.Lock()
    clients = [_SlowToPlace(moves, lock, k) for k in range(6)]
    context = ClientContext(client_update=lambda *_: None, clients=clients)  # type: ignore[arg-type]
    downlink = fl.Downlink(round=0, params={"w": torch.zeros(2)})
    placement = Placement((torch.device("cpu"), torch.device("cpu")))
    job = PlacedJob(placement, ClientJob(context, downlink), torch.device("cpu"))
    start = threading.Barrier(8)

    def read(worker: int) -> tuple[int, list[int]]:
        start.wait()  # every thread asks for the same context, job and clients at once
        index = worker % 2
        device_job = job.device_job(index)
        placed = placement.context(context, index).clients
        return id(device_job), [id(placed[k]) for k in range(len(clients))]

    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(read, range(8)))
    # One job per device index, and every client moved once (both indices are the one CPU, so
    # the second index finds the first one's copy in the device's memo).
    assert len({job_id for job_id, _ in seen[0::2]}) == 1
    assert len({job_id for job_id, _ in seen[1::2]}) == 1
    assert moves == Counter(range(6)), moves
    assert placement.placements == Counter({(k, i): 1 for k in range(6) for i in (0, 1)})


def test_a_spilling_store_read_and_updated_from_many_threads_stays_exact() -> None:
    # A budget of two records: versions made in parallel spill and free each other's records.
    one = 4 * 16
    store = fl.ClientStore(10_000, fl.StoreOptions(memory_bytes=2 * one))
    start = threading.Barrier(8)

    def churn(worker: int) -> int:
        mine = store
        start.wait()
        for step in range(40):
            cid = worker * 1000 + step
            value = torch.full((16,), float(worker * 100 + step))
            mine = mine.updated({cid: {"v": value}})
            for back in range(max(0, step - 3), step + 1):
                got = mine[worker * 1000 + back]["v"]
                assert torch.equal(got, torch.full((16,), float(worker * 100 + back)))
        assert len(mine.ids()) == 40
        return mine.spilled_bytes

    with ThreadPoolExecutor(8) as pool:
        spilled = list(pool.map(churn, range(8)))
    assert max(spilled) > 0  # the budget was exceeded, so records went to files
    gc.collect()
    # Every version made in the threads is gone: the shared accounting must come back to zero.
    assert (store.memory_bytes, store.spilled_bytes) == (0, 0)


_GUARD_UNDER_GC = """
import gc, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from blazefl_fn.executors.jobs import global_rng_guard

def callback(phase, info):  # Python work inside a collection, as hypothesis's callback does
    total = 0
    for i in range(2000):  # bytecode, where the interpreter may hand the GIL over
        total += i

gc.callbacks.append(callback)
gc.set_threshold(50, 1, 1)  # collections during the guard's reads
sys.setswitchinterval(1e-5)  # hand the GIL over inside the callback

def client(_):
    junk = []
    for _ in range(20000):
        junk.append([object() for _ in range(3)])
        if len(junk) > 100:
            junk.clear()
        with global_rng_guard(True, torch.device("cpu")):
            pass

with ThreadPoolExecutor(2) as pool:
    list(pool.map(client, range(2)))
print("done")
"""


def test_the_global_rng_guard_in_two_threads_survives_gc_callbacks(tmp_path: Path) -> None:
    # Before: two threads reading torch's global RNG state deadlocked within seconds once a
    # gc callback let the GIL go inside one read (found as a hung Threads map in the suite,
    # after hypothesis had registered its callback in that process). A subprocess, so that a
    # deadlock fails this test instead of stopping the test process.
    script = tmp_path / "guard_under_gc.py"
    script.write_text(_GUARD_UNDER_GC)
    try:
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("two threads in the global-RNG guard stopped for good (deadlock)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
