"""A small-CNN FedAvg job on CIFAR-shaped data, for the portable-numerics tests.

    python tests/_portable_job.py EXECUTOR [--portable]

prints ``<params_sha256> <ATen capability>``. Run in a fresh process: the pins only act
before torch's first kernel.
"""

from __future__ import annotations

import functools
import sys

import torch

import blazefl_fn as fl
from blazefl_fn import portable
from blazefl_fn.data import ClientData, TensorDataset
from blazefl_fn.models import cnn, intra_op_threads


def main(argv: list[str]) -> None:
    if "--portable" in argv:
        portable.enable()  # before any tensor operation
    key = fl.Key.from_seed(0)
    generator = key.fold_in("data").torch_generator()
    base = TensorDataset(
        torch.randn(6 * 20, 3, 32, 32, generator=generator),
        torch.randint(0, 10, (6 * 20,), generator=generator),
    )
    clients = [ClientData(base, torch.arange(i * 20, (i + 1) * 20)) for i in range(6)]
    algorithm = fl.fedavg(
        functools.partial(cnn, (3, 32, 32), 10),
        num_clients=6,
        clients_per_round=4,
        local=fl.LocalSGD(batch_size=10, lr=0.05),
    )
    executors = {
        "sequential": lambda: fl.Sequential(),
        "threads": lambda: fl.Threads(2),
        "processes": lambda: fl.Processes(2),
    }
    with intra_op_threads(1), executors[argv[0]]() as ex:
        state = algorithm.init(key.fold_in("init"))
        state, _ = fl.run_rounds(fl.make_round(algorithm, clients, ex), state, key, until=2)
    print(fl.tree.digest(state.params), portable.cpu_capability())


if __name__ == "__main__":
    main(sys.argv[1:])
