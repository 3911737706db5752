"""blazefl_fn: fast, deterministic federated-learning simulation built from pure functions.

Example:
    >>> import blazefl_fn as fl
    >>> result = fl.simulate(fl.RunConfig(rounds=1, clients=4, clients_per_round=2))
    >>> result.reports[0].clients
    (1, 2)
"""

from . import data as data
from . import tree as tree
from .algorithms.fedavg import fedavg as fedavg
from .data.datasets import ClientData as ClientData
from .data.datasets import FederatedDataset as FederatedDataset
from .data.datasets import TensorDataset as TensorDataset
from .executors.base import Executor as Executor
from .executors.processes import Processes as Processes
from .executors.processes import WorkerError as WorkerError
from .executors.sequential import Sequential as Sequential
from .executors.threads import Threads as Threads
from .keys import Key as Key
from .local import LocalSGD as LocalSGD
from .local import evaluate as evaluate
from .local import train_local as train_local
from .records import Downlink as Downlink
from .records import RoundReport as RoundReport
from .records import ServerState as ServerState
from .records import Uplink as Uplink
from .reproducibility import build_module as build_module
from .round import Algorithm as Algorithm
from .round import ClientError as ClientError
from .round import ClientTask as ClientTask
from .round import make_round as make_round
from .round import run_round as run_round
from .round import uniform_sampler as uniform_sampler
from .run import RunConfig as RunConfig
from .run import RunResult as RunResult
from .run import run_rounds as run_rounds
from .run import simulate as simulate

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ClientData",
    "ClientError",
    "ClientTask",
    "Downlink",
    "Executor",
    "FederatedDataset",
    "Key",
    "LocalSGD",
    "Processes",
    "RoundReport",
    "RunConfig",
    "RunResult",
    "Sequential",
    "ServerState",
    "TensorDataset",
    "Threads",
    "Uplink",
    "WorkerError",
    "build_module",
    "data",
    "evaluate",
    "fedavg",
    "make_round",
    "run_round",
    "run_rounds",
    "simulate",
    "train_local",
    "tree",
    "uniform_sampler",
]
