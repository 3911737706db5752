"""BlazeFL 2.0.3: its contrib FedAvg with the thread trainer or the process trainer.

Runs inside ``benchmarks/.peers/blazefl``. The loop is BlazeFL's own usage pattern::

    while not handler.if_stop():
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for package in trainer.uplink_package():
            handler.load(package)

with ``FedAvgBaseServerHandler`` (sample ratio 1) and either ``FedAvgThreadPoolClientTrainer``
(``threads``) or ``FedAvgProcessPoolClientTrainer`` with ``IPCMode.SHARED_MEMORY`` and the
spawn start method (``processes``; it creates a new process pool inside every round). Client
data come from a ``PartitionedDataset`` over the shared base tensors whose ``DataLoader``
fetches each mini-batch with one gather (``__getitems__``) instead of per-example indexing;
BlazeFL's own training step (``torch.optim.SGD``, ``CrossEntropyLoss``) is used unchanged.
The server model starts from the shared initial parameters; tqdm bars are off
(``TQDM_DISABLE=1`` in the environment).
"""

from __future__ import annotations

import tempfile
import time
from enum import StrEnum
from pathlib import Path

import torch
import torch.multiprocessing as mp
from blazefl.contrib import (
    FedAvgBaseServerHandler,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
)
from blazefl.core import IPCMode
from torch.utils.data import DataLoader, Dataset

from .. import models
from ..common import digest, load_arrays, load_init
from ..spec import Case, RunnerResult
from ._base import read_case


class ModelSelector:
    """BlazeFL's model selector: builds the benchmark's models by name."""

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def select_model(self, model_name: str) -> torch.nn.Module:
        return models.build(model_name, self.classes)


class ClientView(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One client's examples as a map-style dataset with batched fetching."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> None:
        self.x, self.y, self.indices = x, y, indices

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.indices[i]
        return self.x[row], self.y[row]

    def __getitems__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.indices[torch.as_tensor(batch)]
        return self.x[rows], self.y[rows]


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn``: `ClientView.__getitems__` already returns a batch."""
    return batch


class Split(StrEnum):
    TRAIN = "train"
    TEST = "test"


class PartitionedData:
    """BlazeFL's ``PartitionedDataset`` protocol over the shared base tensors."""

    def __init__(self, data_dir: str) -> None:
        arrays = load_arrays(data_dir)
        self.x, self.y = arrays.x, arrays.y
        self.clients = [arrays.client(i) for i in range(arrays.num_clients)]

    def get_dataset(self, type_: StrEnum, cid: int | None) -> ClientView:
        indices = self.clients[cid] if cid is not None else torch.arange(self.y.shape[0])
        return ClientView(self.x, self.y, indices)

    def set_dataset(self, type_: StrEnum, cid: int | None, dataset: Dataset[object]) -> None:
        """Nothing to store: views are rebuilt on demand."""

    def get_dataloader(
        self,
        type_: StrEnum,
        cid: int | None,
        batch_size: int | None,
        generator: torch.Generator | None,
    ) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        return DataLoader(
            self.get_dataset(type_, cid),
            batch_size=batch_size,
            shuffle=type_ == Split.TRAIN,
            generator=generator,
            collate_fn=keep_batch,
        )


def run(case: Case) -> RunnerResult:
    """Run the case with BlazeFL's server handler and the chosen client trainer."""
    work = case.workload
    torch.set_num_threads(case.threads)
    dataset = PartitionedData(case.data_dir)
    selector = ModelSelector(work.classes)
    handler = FedAvgBaseServerHandler(
        model_selector=selector,  # type: ignore[arg-type]  # structural protocol
        model_name=work.model,
        dataset=dataset,  # type: ignore[arg-type]
        global_round=work.rounds,
        num_clients=work.clients,
        sample_ratio=1.0,
        device="cpu",
        batch_size=work.batch_size,
        seed=work.seed,
    )
    handler.model.load_state_dict(load_init(case.data_dir))
    common = {
        "model_selector": selector,
        "model_name": work.model,
        "dataset": dataset,
        "device": "cpu",
        "num_clients": work.clients,
        "epochs": work.epochs,
        "batch_size": work.batch_size,
        "lr": work.lr,
        "seed": work.seed,
        "num_parallels": case.parallelism,
    }
    scratch = tempfile.TemporaryDirectory(prefix="blazefl-peer-")
    if case.mode == "threads":
        trainer = FedAvgThreadPoolClientTrainer(**common)  # type: ignore[arg-type]
    elif case.mode == "processes":
        mp.set_start_method("spawn", force=True)
        trainer = FedAvgProcessPoolClientTrainer(
            share_dir=Path(scratch.name) / "share",
            state_dir=Path(scratch.name) / "state",
            ipc_mode=IPCMode.SHARED_MEMORY,
            **common,  # type: ignore[arg-type]
        )
    else:
        raise SystemExit(f"blazefl: unknown mode {case.mode!r}")
    round_times: list[float] = []
    loop_start = time.time()
    start = time.perf_counter()
    while not handler.if_stop():
        round_start = time.perf_counter()
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for package in trainer.uplink_package():
            handler.load(package)  # type: ignore[arg-type]
        round_times.append(time.perf_counter() - round_start)
    loop_seconds = time.perf_counter() - start
    final = digest(handler.model.state_dict())
    scratch.cleanup()
    return RunnerResult(
        loop_start=loop_start, loop_seconds=loop_seconds, round_seconds=round_times, digest=final
    )


if __name__ == "__main__":
    run(read_case()).emit()
