"""blazefl_fn: fast, deterministic federated-learning simulation built from pure functions.

Examples:
    >>> import blazefl_fn as fl
    >>> result = fl.simulate(fl.RunConfig(rounds=1, clients=4, clients_per_round=2))
    >>> result.reports[0].clients
    (1, 2)
"""

# First, before torch: Ctrl-C while the blazefl-fn command is still importing ends it quietly
# (importing the cli package arms it; its machinery loads only when main runs).
from . import cli as cli

# isort: split
from . import algorithms as algorithms
from . import client as client
from . import data as data
from . import errors as errors
from . import executors as executors
from . import portable as portable
from . import privacy as privacy
from . import run as run
from . import server as server
from . import tree as tree
from .algorithms.compose import Aggregate as Aggregate
from .algorithms.compose import compose as compose
from .algorithms.compose import fedadagrad as fedadagrad
from .algorithms.compose import fedadam as fedadam
from .algorithms.compose import fedavgm as fedavgm
from .algorithms.compose import fedmedian as fedmedian
from .algorithms.compose import fedprox as fedprox
from .algorithms.compose import fedyogi as fedyogi
from .algorithms.compose import krum_fedavg as krum_fedavg
from .algorithms.compose import trimmed_mean_fedavg as trimmed_mean_fedavg
from .algorithms.ditto import ditto as ditto
from .algorithms.dsfl import dsfl as dsfl
from .algorithms.fedavg import fedavg as fedavg
from .algorithms.feddyn import feddyn as feddyn
from .algorithms.fednova import fednova as fednova
from .algorithms.fedper import fedper as fedper
from .algorithms.fedrep import fedrep as fedrep
from .algorithms.personal import PersonalState as PersonalState
from .algorithms.personal import personalized as personalized
from .algorithms.scaffold import scaffold as scaffold
from .algorithms.scarlet import scarlet as scarlet
from .client import chunk as _chunk  # noqa: F401  # pyright: ignore[reportUnusedImport]
from .client import distillation as _distillation  # noqa: F401  # pyright: ignore[reportUnusedImport]
from .client import optim as _client_optim  # noqa: F401  # pyright: ignore[reportUnusedImport]
from .client.distillation import Distillation as Distillation
from .client.evaluation import evaluate as evaluate
from .client.evaluation import evaluate_clients as evaluate_clients
from .client.stochastic import KeyedDropout as KeyedDropout
from .client.training import LocalResult as LocalResult
from .client.training import LocalSGD as LocalSGD
from .client.training import LocalTraining as LocalTraining
from .client.training import Trained as Trained
from .client.training import train as train
from .client.training import trainable_names as trainable_names
from .data.datasets import ClientData as ClientData
from .data.datasets import FederatedDataset as FederatedDataset
from .data.datasets import TensorDataset as TensorDataset
from .data.synthetic import SyntheticClients as SyntheticClients
from .errors import ChunkError as ChunkError
from .errors import ClientError as ClientError
from .errors import GlobalRNGError as GlobalRNGError
from .errors import MissingStage as MissingStage
from .errors import NonFiniteError as NonFiniteError
from .errors import OutputLockedError as OutputLockedError
from .errors import PerClientFallback as PerClientFallback
from .errors import WorkerError as WorkerError
from .executors.base import Executor as Executor
from .executors.jobs import VectorizedUpdate as VectorizedUpdate
from .executors.processes import Processes as Processes
from .executors.ray_pool import Ray as Ray
from .executors.ray_pool import join_ray_cluster as join_ray_cluster
from .executors.sequential import Sequential as Sequential
from .executors.threads import Threads as Threads
from .executors.vectorized import Vectorized as Vectorized
from .keys import STREAMS_VERSION as STREAMS_VERSION
from .keys import Key as Key
from .models import ModelFactory as ModelFactory
from .models import build_module as build_module
from .models import build_template as build_template
from .privacy.mechanisms import AdaptiveClipping as AdaptiveClipping
from .privacy.mechanisms import CentralDP as CentralDP
from .privacy.mechanisms import LocalDP as LocalDP
from .privacy.privatize import Accountant as Accountant
from .privacy.privatize import PrivacyBudget as PrivacyBudget
from .privacy.privatize import privatize as privatize
from .records import ClientInput as ClientInput
from .records import ClientTask as ClientTask
from .records import Downlink as Downlink
from .records import RoundReport as RoundReport
from .records import ServerState as ServerState
from .records import Uplink as Uplink
from .round import Algorithm as Algorithm
from .round import KeyedAggregate as KeyedAggregate
from .round import make_round as make_round
from .round import on_server as on_server
from .round import run_round as run_round
from .run.checkpoint import CheckpointWriter as CheckpointWriter
from .run.checkpoint import load_checkpoint as load_checkpoint
from .run.checkpoint import save_checkpoint as save_checkpoint
from .run.config import RunConfig as RunConfig
from .run.loop import Callback as Callback
from .run.loop import EarlyStop as EarlyStop
from .run.loop import LoopResult as LoopResult
from .run.loop import RoundEvent as RoundEvent
from .run.loop import run_loop as run_loop
from .run.metrics_log import MetricsLog as MetricsLog
from .run.metrics_log import read_metrics as read_metrics
from .run.simulate import RunResult as RunResult
from .run.simulate import run_rounds as run_rounds
from .run.simulate import simulate as simulate
from .server import aggregators as _aggregators  # noqa: F401  # pyright: ignore[reportUnusedImport]
from .server import optim as _server_optim  # noqa: F401  # pyright: ignore[reportUnusedImport]
from .server.client_state import ClientStore as ClientStore
from .server.client_state import StateLayout as StateLayout
from .server.client_state import StoreOptions as StoreOptions
from .server.sampling import PoissonSampler as PoissonSampler
from .server.sampling import poisson_sampler as poisson_sampler
from .server.sampling import uniform_sampler as uniform_sampler

__version__ = "0.2.0.dev0"

__all__ = [
    "STREAMS_VERSION",
    "Accountant",
    "AdaptiveClipping",
    "Aggregate",
    "Algorithm",
    "Callback",
    "CentralDP",
    "CheckpointWriter",
    "ChunkError",
    "ClientData",
    "ClientError",
    "ClientInput",
    "ClientStore",
    "ClientTask",
    "Distillation",
    "Downlink",
    "EarlyStop",
    "Executor",
    "FederatedDataset",
    "GlobalRNGError",
    "Key",
    "KeyedAggregate",
    "KeyedDropout",
    "LocalDP",
    "LocalResult",
    "LocalSGD",
    "LocalTraining",
    "LoopResult",
    "MetricsLog",
    "MissingStage",
    "ModelFactory",
    "NonFiniteError",
    "OutputLockedError",
    "PerClientFallback",
    "PersonalState",
    "PoissonSampler",
    "PrivacyBudget",
    "Processes",
    "Ray",
    "RoundEvent",
    "RoundReport",
    "RunConfig",
    "RunResult",
    "Sequential",
    "ServerState",
    "StateLayout",
    "StoreOptions",
    "SyntheticClients",
    "TensorDataset",
    "Threads",
    "Trained",
    "Uplink",
    "Vectorized",
    "VectorizedUpdate",
    "WorkerError",
    "algorithms",
    "build_module",
    "build_template",
    "cli",
    "client",
    "compose",
    "data",
    "ditto",
    "dsfl",
    "errors",
    "evaluate",
    "evaluate_clients",
    "executors",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "feddyn",
    "fedmedian",
    "fednova",
    "fedper",
    "fedprox",
    "fedrep",
    "fedyogi",
    "join_ray_cluster",
    "krum_fedavg",
    "load_checkpoint",
    "make_round",
    "on_server",
    "personalized",
    "poisson_sampler",
    "portable",
    "privacy",
    "privatize",
    "read_metrics",
    "run",
    "run_loop",
    "run_round",
    "run_rounds",
    "save_checkpoint",
    "scaffold",
    "scarlet",
    "server",
    "simulate",
    "train",
    "trainable_names",
    "tree",
    "trimmed_mean_fedavg",
    "uniform_sampler",
]
