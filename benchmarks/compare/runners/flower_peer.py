"""Flower (``flwr[simulation]``, 1.41): ``run_simulation`` with the Ray backend, message API.

Runs inside ``benchmarks/.peers/flower``. The ``ClientApp`` registers a ``train`` function
(and a ``query`` function used once per actor for warm-up); the ``ServerApp`` main runs
``flwr.serverapp.strategy.FedAvg`` (fraction_train 1, no federated evaluation) with
``strategy.start``. Ray starts with ``num_cpus = P`` and each client asks for one CPU, so P
actors run clients concurrently. The client code is the shared bare client update
(`benchmarks.compare.common.train_client`); each actor loads the data files once and keeps
them for the run, as a Flower ``client_fn`` caching its partition would.

Start-up covers importing Flower, starting Ray and its actors and one warm-up message per
actor; the round loop is ``strategy.start`` (three ``send_and_receive`` rounds and their
aggregation).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from ..common import digest, load_init
from ..spec import Case, RunnerResult
from ._base import read_case
from .flower_client import client_app

# -- server side ---------------------------------------------------------------------------


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording when each round is configured and aggregated."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_starts: list[float] = []
        self.round_ends: list[float] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.round_starts.append(time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = super().aggregate_train(server_round, replies)
        self.round_ends.append(time.perf_counter())
        return out


def _server_app(case: Case, out: dict[str, Any]) -> ServerApp:
    work = case.workload
    config = ConfigRecord(
        {
            "data_dir": case.data_dir,
            "model": work.model,
            "classes": work.classes,
            "threads": case.threads,
            "seed": work.seed,
            "epochs": work.epochs,
            "batch_size": work.batch_size,
            "lr": work.lr,
        }
    )
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < work.clients:
            time.sleep(0.05)
        # Warm-up (start-up, not timed as the loop): one tiny query per actor.
        nodes = sorted(grid.get_node_ids())[: case.parallelism]
        warm = [
            Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        grid.send_and_receive(warm)
        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=work.clients,
            min_available_nodes=work.clients,
        )
        out["loop_start"] = time.time()
        start = time.perf_counter()
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(load_init(case.data_dir)),
            num_rounds=work.rounds,
            train_config=config,
        )
        out["loop_seconds"] = time.perf_counter() - start
        out["round_seconds"] = [
            e - s for s, e in zip(strategy.round_starts, strategy.round_ends, strict=True)
        ]
        out["digest"] = digest(result.arrays.to_torch_state_dict())

    return app


def run(case: Case) -> RunnerResult:
    """Run the case with ``run_simulation`` on the Ray backend."""
    torch.set_num_threads(case.threads)
    out: dict[str, Any] = {}
    run_simulation(
        server_app=_server_app(case, out),
        client_app=client_app,
        num_supernodes=case.workload.clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": case.parallelism, "num_gpus": 0},
        },
    )
    if "digest" not in out:
        raise SystemExit("flower: the ServerApp did not finish (see the log above)")
    return RunnerResult(
        loop_start=out["loop_start"],
        loop_seconds=out["loop_seconds"],
        round_seconds=out["round_seconds"],
        digest=out["digest"],
    )


if __name__ == "__main__":
    run(read_case()).emit()
