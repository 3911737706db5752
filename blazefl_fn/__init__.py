"""blazefl_fn: fast, deterministic federated-learning simulation built from pure functions.

Examples:
    >>> import blazefl_fn as fl
    >>> result = fl.simulate(fl.RunConfig(rounds=1, clients=4, clients_per_round=2))
    >>> result.reports[0].clients
    (1, 2)
"""

# First, before torch: Ctrl-C while the blazefl-fn command is still importing ends it quietly.
from . import _cli_signals  # noqa: F401  # pyright: ignore[reportUnusedImport] (arms it)
from . import aggregators as aggregators
from . import algorithms as algorithms
from . import client_stages as client_stages
from . import client_state as client_state
from . import client_store as client_store
from . import data as data
from . import devices as devices
from . import portable as portable
from . import privacy as privacy
from . import server_transforms as server_transforms
from . import stochastic as stochastic
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
from .algorithms.dsfl import dsfl as dsfl
from .algorithms.fedavg import fedavg as fedavg
from .algorithms.feddyn import feddyn as feddyn
from .algorithms.fednova import fednova as fednova
from .algorithms.scaffold import scaffold as scaffold
from .algorithms.scarlet import scarlet as scarlet
from .checkpoint import CheckpointWriter as CheckpointWriter
from .checkpoint import OutputLockedError as OutputLockedError
from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import save_checkpoint as save_checkpoint
from .client_store import ClientStore as ClientStore
from .client_store import StateLayout as StateLayout
from .client_store import StoreOptions as StoreOptions
from .data.datasets import ClientData as ClientData
from .data.datasets import FederatedDataset as FederatedDataset
from .data.datasets import TensorDataset as TensorDataset
from .data.synthetic import SyntheticClients as SyntheticClients
from .executors.base import Executor as Executor
from .executors.processes import Processes as Processes
from .executors.processes import WorkerError as WorkerError
from .executors.ray_pool import Ray as Ray
from .executors.sequential import Sequential as Sequential
from .executors.threads import Threads as Threads
from .executors.vectorized import PerClientFallback as PerClientFallback
from .executors.vectorized import Vectorized as Vectorized
from .jobs import ChunkError as ChunkError
from .jobs import GlobalRNGError as GlobalRNGError
from .jobs import MissingStage as MissingStage
from .jobs import NonFiniteError as NonFiniteError
from .jobs import VectorizedUpdate as VectorizedUpdate
from .keys import STREAMS_VERSION as STREAMS_VERSION
from .keys import Key as Key
from .local import Distillation as Distillation
from .local import evaluate as evaluate
from .local import evaluate_clients as evaluate_clients
from .local_training import LocalResult as LocalResult
from .local_training import LocalSGD as LocalSGD
from .local_training import LocalTraining as LocalTraining
from .local_training import Trained as Trained
from .local_training import train as train
from .local_training import trainable_names as trainable_names
from .metrics_log import MetricsLog as MetricsLog
from .metrics_log import read_metrics as read_metrics
from .privacy import Accountant as Accountant
from .privacy import AdaptiveClipping as AdaptiveClipping
from .privacy import CentralDP as CentralDP
from .privacy import LocalDP as LocalDP
from .privacy import PrivacyBudget as PrivacyBudget
from .privacy import privatize as privatize
from .records import Downlink as Downlink
from .records import RoundReport as RoundReport
from .records import ServerState as ServerState
from .records import Uplink as Uplink
from .reproducibility import ModelFactory as ModelFactory
from .reproducibility import build_module as build_module
from .reproducibility import build_template as build_template
from .round import Algorithm as Algorithm
from .round import ClientError as ClientError
from .round import ClientInput as ClientInput
from .round import ClientTask as ClientTask
from .round import KeyedAggregate as KeyedAggregate
from .round import PoissonSampler as PoissonSampler
from .round import make_round as make_round
from .round import on_server as on_server
from .round import poisson_sampler as poisson_sampler
from .round import run_round as run_round
from .round import uniform_sampler as uniform_sampler
from .run import RunConfig as RunConfig
from .run import RunResult as RunResult
from .run import run_rounds as run_rounds
from .run import simulate as simulate
from .runner import Callback as Callback
from .runner import EarlyStop as EarlyStop
from .runner import LoopResult as LoopResult
from .runner import RoundEvent as RoundEvent
from .runner import run_loop as run_loop
from .stochastic import KeyedDropout as KeyedDropout

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
    "aggregators",
    "algorithms",
    "build_module",
    "build_template",
    "client_stages",
    "client_state",
    "client_store",
    "compose",
    "data",
    "devices",
    "dsfl",
    "evaluate",
    "evaluate_clients",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "feddyn",
    "fedmedian",
    "fednova",
    "fedprox",
    "fedyogi",
    "krum_fedavg",
    "load_checkpoint",
    "make_round",
    "on_server",
    "poisson_sampler",
    "portable",
    "privacy",
    "privatize",
    "read_metrics",
    "run_loop",
    "run_round",
    "run_rounds",
    "save_checkpoint",
    "scaffold",
    "scarlet",
    "server_transforms",
    "simulate",
    "stochastic",
    "train",
    "trainable_names",
    "tree",
    "trimmed_mean_fedavg",
    "uniform_sampler",
]
