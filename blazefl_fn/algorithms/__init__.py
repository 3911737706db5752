"""Federated algorithms, each a composition of pure stages on the shared round machinery.

`stages` holds the stock stages every algorithm reuses (the model's initialisation, the
broadcast of the global parameters, `TrainUpdate` — local training and its uplink — and the
mean by examples); `compose` builds the FedAvg family from a client stage and an aggregate
stage; the other modules are one algorithm each (SCAFFOLD, FedDyn, FedNova, DS-FL, SCARLET) or
the pieces the distillation algorithms share (soft labels, the label cache); `personal` is the
machinery of the personalised algorithms (Ditto, FedRep, FedPer), which keep a personal tree per
client."""

from .compose import Aggregate as Aggregate
from .compose import compose as compose
from .compose import fedadagrad as fedadagrad
from .compose import fedadam as fedadam
from .compose import fedavgm as fedavgm
from .compose import fedmedian as fedmedian
from .compose import fedprox as fedprox
from .compose import fedyogi as fedyogi
from .compose import krum_fedavg as krum_fedavg
from .compose import trimmed_mean_fedavg as trimmed_mean_fedavg
from .ditto import DittoUpdate as DittoUpdate
from .ditto import ditto as ditto
from .ditto import ditto_personal as ditto_personal
from .dsfl import DSFLState as DSFLState
from .dsfl import dsfl as dsfl
from .fedavg import fedavg as fedavg
from .feddyn import FedDynState as FedDynState
from .feddyn import FedDynUpdate as FedDynUpdate
from .feddyn import dynamic as dynamic
from .feddyn import feddyn as feddyn
from .feddyn import feddyn_dispatch as feddyn_dispatch
from .fednova import fednova as fednova
from .fednova import normalizer as normalizer
from .fedper import FedPerUpdate as FedPerUpdate
from .fedper import fedper as fedper
from .fedrep import FedRepUpdate as FedRepUpdate
from .fedrep import fedrep as fedrep
from .label_cache import CacheSignal as CacheSignal
from .label_cache import SoftLabelCache as SoftLabelCache
from .label_cache import is_fresh as is_fresh
from .personal import PersonalState as PersonalState
from .personal import last_layer as last_layer
from .personal import personal_dispatch as personal_dispatch
from .personal import personal_names as personal_names
from .personal import personalized as personalized
from .personal import split_head as split_head
from .scaffold import ScaffoldState as ScaffoldState
from .scaffold import ScaffoldUpdate as ScaffoldUpdate
from .scaffold import corrected as corrected
from .scaffold import scaffold as scaffold
from .scaffold import scaffold_broadcast as scaffold_broadcast
from .scaffold import scaffold_dispatch as scaffold_dispatch
from .scarlet import ScarletState as ScarletState
from .scarlet import scarlet as scarlet
from .soft_labels import enhanced_era as enhanced_era
from .soft_labels import era as era
from .stages import AggregateStage as AggregateStage
from .stages import ModelInit as ModelInit
from .stages import SelectedAggregate as SelectedAggregate
from .stages import TrainUpdate as TrainUpdate
from .stages import aggregate_except as aggregate_except
from .stages import aggregate_only as aggregate_only
from .stages import broadcast_params as broadcast_params
from .stages import mean_by_examples as mean_by_examples
from .stages import mean_uniform as mean_uniform

__all__ = [
    "Aggregate",
    "AggregateStage",
    "CacheSignal",
    "DSFLState",
    "DittoUpdate",
    "FedDynState",
    "FedDynUpdate",
    "FedPerUpdate",
    "FedRepUpdate",
    "ModelInit",
    "PersonalState",
    "ScaffoldState",
    "ScaffoldUpdate",
    "ScarletState",
    "SelectedAggregate",
    "SoftLabelCache",
    "TrainUpdate",
    "aggregate_except",
    "aggregate_only",
    "broadcast_params",
    "compose",
    "corrected",
    "ditto",
    "ditto_personal",
    "dsfl",
    "dynamic",
    "enhanced_era",
    "era",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "feddyn",
    "feddyn_dispatch",
    "fedmedian",
    "fednova",
    "fedper",
    "fedprox",
    "fedrep",
    "fedyogi",
    "is_fresh",
    "krum_fedavg",
    "last_layer",
    "mean_by_examples",
    "mean_uniform",
    "normalizer",
    "personal_dispatch",
    "personal_names",
    "personalized",
    "scaffold",
    "scaffold_broadcast",
    "scaffold_dispatch",
    "scarlet",
    "split_head",
    "trimmed_mean_fedavg",
]
