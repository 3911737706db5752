"""blazefl_fn's FedAvg with its own executors: ``sequential``, ``threads``, ``processes``, ``ray``.

Uses the public API only: ``fedavg`` + ``LocalSGD``, ``ClientData`` views onto one
``TensorDataset``, ``make_round`` / ``run_rounds``, ``intra_op_threads``. The model is
``blazefl_fn.models.cnn((3, 32, 32), 10)`` itself (or the benchmark's ResNet-18); the run starts
from the shared initial parameters. Start-up (imports, data, the executor's construction, which
for ``processes`` spawns the workers and for ``ray`` starts a local Ray instance and its actors,
and ``make_round``, which for ``processes`` sends the client data into shared memory once and for
``ray`` puts it in Ray's object store once) happens before ``loop_start``. Ray's node binds
127.0.0.2 (loopback: Ray replaces 127.0.0.1 itself by the machine's network address).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

import blazefl_fn as fl
from blazefl_fn.data import ClientData, TensorDataset
from blazefl_fn.models import ModelFactory, cnn, intra_op_threads
from tools.ft_check import gil_enabled

from .. import models
from ..common import load_arrays, load_init
from ..spec import Case, RunnerResult
from ._base import read_case


def _executor(case: Case) -> fl.Executor:
    if case.mode == "sequential":
        return fl.Sequential()
    if case.mode == "threads":
        return fl.Threads(case.parallelism)
    if case.mode == "processes":
        return fl.Processes(case.parallelism, threads=case.threads)
    if case.mode == "ray":
        return fl.Ray(workers=case.parallelism, threads=case.threads, node_ip_address="127.0.0.2")
    raise SystemExit(f"blazefl_fn: unknown mode {case.mode!r}")


def run(case: Case) -> RunnerResult:
    """Run the case's round loop with blazefl_fn."""
    work = case.workload
    arrays = load_arrays(case.data_dir)
    base = TensorDataset(arrays.x, arrays.y)
    clients = tuple(ClientData(base, arrays.client(i)) for i in range(arrays.num_clients))
    model_fn: ModelFactory = (
        functools.partial(cnn, (3, 32, 32), work.classes)
        if work.model == "cnn"
        else functools.partial(models.build, work.model, work.classes)
    )
    algorithm = fl.fedavg(
        model_fn,
        num_clients=len(clients),
        clients_per_round=len(clients),
        local=fl.LocalSGD(epochs=work.epochs, batch_size=work.batch_size, lr=work.lr),
    )
    state = fl.ServerState(params=load_init(case.data_dir))
    run_key = fl.Key.from_seed(work.seed)
    with intra_op_threads(case.threads), _executor(case) as executor:
        round_fn = fl.make_round(algorithm, clients, executor)
        loop_start = time.time()
        start = time.perf_counter()
        state, reports = fl.run_rounds(round_fn, state, run_key, until=work.rounds)
        loop_seconds = time.perf_counter() - start
    return RunnerResult(
        loop_start=loop_start,
        loop_seconds=loop_seconds,
        round_seconds=[r.seconds for r in reports],
        digest=fl.tree.digest(state.params),
        notes={
            "torch": torch.__version__,
            "gil": gil_enabled(),
            "blazefl_fn": str(Path(fl.__file__).resolve().parent),
        },
    )


if __name__ == "__main__":
    run(read_case()).emit()
