"""Federated datasets: records, the Synthetic(alpha, beta) benchmark and MNIST."""

from .datasets import ClientData as ClientData
from .datasets import FederatedDataset as FederatedDataset
from .datasets import TensorDataset as TensorDataset
from .mnist import load_mnist as load_mnist
from .mnist import mnist_federated as mnist_federated
from .mnist import read_idx as read_idx
from .synthetic import synthetic as synthetic

__all__ = [
    "ClientData",
    "FederatedDataset",
    "TensorDataset",
    "load_mnist",
    "mnist_federated",
    "read_idx",
    "synthetic",
]
