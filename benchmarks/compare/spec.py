"""Workloads, cases and runner results: plain dataclasses that travel between processes as JSON.

Standard library only: this module is imported by the runners inside the peers' venvs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FRAMEWORKS = ("bare", "blazefl_fn", "flower", "blazefl")
# Modes per framework, in table order. "sequential" is the P = 1 reference only.
MODES: dict[str, tuple[str, ...]] = {
    "bare": ("sequential", "threads", "processes"),
    "blazefl_fn": ("sequential", "threads", "processes", "ray"),
    "flower": ("ray",),
    "blazefl": ("threads", "processes"),
}
# Modes that run only when named in ``--only`` (``blazefl_fn:ray`` starts a Ray instance per
# run, ~20 s of start-up on 2 cores).
ON_REQUEST = frozenset({"blazefl_fn:ray"})
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Workload:
    """One FedAvg workload: data shape, partition, model and local training.

    Every client is sampled in every round (FedAvg with fraction 1), so all frameworks do the
    same amount of client work.
    """

    name: str
    model: str  # "cnn" (conv6-conv16-fc120-fc84) or "resnet18" (CIFAR ResNet-18)
    clients: int
    samples: int  # examples per client
    epochs: int
    batch_size: int
    lr: float
    rounds: int
    shards_per_client: int = 2
    classes: int = 10
    seed: int = 0
    parallelism: tuple[int, ...] = (1, 2)

    @property
    def data_id(self) -> str:
        """Names the data set: workloads with equal data share one set of files."""
        return (
            f"c{self.clients}-s{self.samples}-k{self.shards_per_client}"
            f"-n{self.classes}-seed{self.seed}-{self.model}"
        )


@dataclass(frozen=True)
class Case:
    """One run: a workload in one framework and mode at parallelism ``parallelism``."""

    workload: Workload
    framework: str
    mode: str
    parallelism: int
    threads: int  # torch intra-op threads per worker
    data_dir: str

    @property
    def label(self) -> str:
        """``framework:mode``."""
        return f"{self.framework}:{self.mode}"

    def to_json(self) -> str:
        """The case as one JSON string (the runners' only argument)."""
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> Case:
        """Inverse of `to_json`."""
        raw = json.loads(text)
        work = raw.pop("workload")
        work["parallelism"] = tuple(work["parallelism"])
        return Case(workload=Workload(**work), **raw)


@dataclass(frozen=True)
class RunnerResult:
    """What a runner measured in its own process (times in seconds, wall clock).

    Attributes:
        loop_start: ``time.time()`` when the round loop started (start-up is measured from the
            launch of the process by the caller).
        loop_seconds: the round loop, from its start to the final global model.
        round_seconds: each round.
        client_seconds: the median time of one client update, where the runner measures it
            (bare runners), else None.
        digest: SHA-256 of the final global parameters (names, dtypes, shapes, bytes).
    """

    loop_start: float
    loop_seconds: float
    round_seconds: list[float]
    digest: str
    client_seconds: float | None = None
    notes: dict[str, Any] = field(default_factory=dict[str, Any])

    def emit(self) -> None:
        """Print the result as the runner's last stdout line."""
        print(RESULT_PREFIX + json.dumps(dataclasses.asdict(self)), flush=True)

    @staticmethod
    def parse(stdout: str) -> RunnerResult:
        """The last result line of a runner's stdout.

        Raises:
            ValueError: no result line.
        """
        for line in reversed(stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                return RunnerResult(**json.loads(line[len(RESULT_PREFIX) :]))
        raise ValueError("the runner printed no result line")
