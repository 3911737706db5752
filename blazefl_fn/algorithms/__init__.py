"""Federated algorithms, each a composition of pure stages on the shared round machinery."""

from .fedavg import LocalSGDUpdate as LocalSGDUpdate
from .fedavg import broadcast_params as broadcast_params
from .fedavg import fedavg as fedavg
from .fedavg import mean_by_examples as mean_by_examples

__all__ = ["LocalSGDUpdate", "broadcast_params", "fedavg", "mean_by_examples"]
