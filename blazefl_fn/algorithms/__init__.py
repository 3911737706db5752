"""Federated algorithms, each a composition of pure stages on the shared round machinery."""

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
from .fedavg import LocalSGDUpdate as LocalSGDUpdate
from .fedavg import broadcast_params as broadcast_params
from .fedavg import fedavg as fedavg
from .fedavg import mean_by_examples as mean_by_examples

__all__ = [
    "Aggregate",
    "LocalSGDUpdate",
    "broadcast_params",
    "compose",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedmedian",
    "fedprox",
    "fedyogi",
    "krum_fedavg",
    "mean_by_examples",
    "trimmed_mean_fedavg",
]
