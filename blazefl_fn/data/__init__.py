"""Federated datasets: records, partitioners, augmentation, the Synthetic, MNIST and CIFAR
loaders, and verified downloads of MNIST and CIFAR.

`datasets` holds the records (`TensorDataset`, `ClientData`, `FederatedDataset`); `partition`
splits a dataset over clients (IID, Dirichlet, shards) from a key; `transforms` is data
augmentation only, drawing from the client key; `synthetic`, `mnist` and `cifar` load or make
the data, and `download` fetches the real datasets with checksums."""

from .cifar import download_cifar10 as download_cifar10
from .cifar import download_cifar100 as download_cifar100
from .cifar import load_cifar10 as load_cifar10
from .cifar import load_cifar100 as load_cifar100
from .datasets import ClientData as ClientData
from .datasets import FederatedDataset as FederatedDataset
from .datasets import TensorDataset as TensorDataset
from .datasets import hold_out_clients as hold_out_clients
from .download import download as download
from .download import extract_tar as extract_tar
from .mnist import download_mnist as download_mnist
from .mnist import load_mnist as load_mnist
from .mnist import mnist_federated as mnist_federated
from .mnist import read_idx as read_idx
from .partition import Partition as Partition
from .partition import PartitionReport as PartitionReport
from .partition import dirichlet as dirichlet
from .partition import iid as iid
from .partition import iid_unbalanced as iid_unbalanced
from .partition import inner_dirichlet as inner_dirichlet
from .partition import partition_report as partition_report
from .partition import quantity_skew as quantity_skew
from .partition import shards as shards
from .synthetic import SyntheticClients as SyntheticClients
from .synthetic import synthetic as synthetic
from .transforms import Chain as Chain
from .transforms import Normalize as Normalize
from .transforms import RandomCrop as RandomCrop
from .transforms import RandomHorizontalFlip as RandomHorizontalFlip
from .transforms import Transform as Transform
from .transforms import chain as chain
from .transforms import cifar_test_transform as cifar_test_transform
from .transforms import cifar_train_transform as cifar_train_transform
from .transforms import normalize as normalize
from .transforms import random_crop as random_crop
from .transforms import random_horizontal_flip as random_horizontal_flip

__all__ = [
    "Chain",
    "ClientData",
    "FederatedDataset",
    "Normalize",
    "Partition",
    "PartitionReport",
    "RandomCrop",
    "RandomHorizontalFlip",
    "SyntheticClients",
    "TensorDataset",
    "Transform",
    "chain",
    "cifar_test_transform",
    "cifar_train_transform",
    "dirichlet",
    "download",
    "download_cifar10",
    "download_cifar100",
    "download_mnist",
    "extract_tar",
    "hold_out_clients",
    "iid",
    "iid_unbalanced",
    "inner_dirichlet",
    "load_cifar10",
    "load_cifar100",
    "load_mnist",
    "mnist_federated",
    "normalize",
    "partition_report",
    "quantity_skew",
    "random_crop",
    "random_horizontal_flip",
    "read_idx",
    "shards",
    "synthetic",
]
