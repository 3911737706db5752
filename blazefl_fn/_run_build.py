"""What a `RunConfig` builds: the federation, the model factory, the algorithm and the
executor (re-exported by `blazefl_fn.run`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import torch

from ._run_config import (
    DEFAULT_SERVER_LR,
    DISTILLATION,
    RunConfig,
)
from .algorithms.compose import (
    Aggregate,
    compose,
    fedadagrad,
    fedadam,
    fedavgm,
    fedmedian,
    fedprox,
    fedyogi,
    krum_fedavg,
    trimmed_mean_fedavg,
)
from .algorithms.dsfl import dsfl
from .algorithms.fedavg import fedavg
from .algorithms.feddyn import feddyn
from .algorithms.fednova import fednova
from .algorithms.scaffold import scaffold
from .algorithms.scarlet import scarlet
from .data.cifar import load_cifar10, load_cifar100
from .data.datasets import ClientData, FederatedDataset, TensorDataset
from .data.mnist import load_mnist
from .data.partition import Partition, dirichlet, iid, inner_dirichlet, shards
from .data.synthetic import synthetic
from .data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    Transform,
    cifar_train_transform,
    normalize,
)
from .devices import parse_devices
from .executors.base import Executor
from .executors.processes import Processes
from .executors.ray_pool import Ray
from .executors.sequential import Sequential
from .executors.threads import Threads
from .executors.vectorized import Vectorized
from .keys import Key
from .local import Distillation, LocalSGD
from .models import cnn, logistic_regression, mlp
from .privacy import Accountant, AdaptiveClipping, CentralDP, LocalDP, privatize
from .reproducibility import ModelFactory
from .round import Algorithm


def _channel_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if dataset == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    return CIFAR100_MEAN, CIFAR100_STD


def load_central(config: RunConfig) -> tuple[TensorDataset, TensorDataset, int]:
    """The train and test sets and class count of the image dataset ``config`` names.

    CIFAR test inputs are normalised with the dataset's channel statistics here, once. So are
    the training inputs, unless ``config.augment``: then they stay in ``[0, 1]`` and
    `train_transform` crops (zero padding, as in the usual recipe), flips and normalises
    every batch.
    """
    assert config.data_dir is not None  # checked by RunConfig
    if config.dataset == "mnist":
        train, test = load_mnist(Path(config.data_dir))
        return train, test, 10
    if config.dataset == "cifar10":
        train, test = load_cifar10(Path(config.data_dir))
        classes = 10
    else:
        train, test = load_cifar100(Path(config.data_dir))
        classes = 100
    mean, std = _channel_stats(config.dataset)
    test = TensorDataset(normalize(test.x, mean, std), test.y)
    if not config.augment:
        train = TensorDataset(normalize(train.x, mean, std), train.y)
    return train, test, classes


def train_transform(config: RunConfig) -> Transform | None:
    """The augmentation of training batches: the CIFAR recipe if ``config.augment``, else None."""
    if not config.augment:
        return None
    return cifar_train_transform(*_channel_stats(config.dataset))


def split(config: RunConfig, labels: torch.Tensor, key: Key) -> Partition:
    """The partition ``config.partition`` names (IID by default) of examples with ``labels``."""
    name = config.partition or "iid"
    if name == "iid":
        return iid(int(labels.shape[0]), config.clients, key)
    if name == "dirichlet":
        return dirichlet(labels, config.clients, config.alpha, key)
    if name == "shards":
        return shards(labels, config.clients, config.shards_per_client, key)
    return inner_dirichlet(labels, config.clients, config.alpha, key)


# Measured: 56.1 KiB per client over 2,000 Synthetic(1, 1) clients (60 features, float32
# inputs and int64 labels, test share included), rounded up for the per-client records.
_SYNTHETIC_BYTES_PER_CLIENT = 60 * 1024


def _available_memory() -> int | None:
    """Bytes of memory the kernel says are available (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(config: RunConfig) -> None:
    """Refuse a synthetic federation too large for this machine's available memory.

    The Synthetic(alpha, beta) clients are generated up front, about 60 KiB each; a
    federation whose data would not fit is refused before any is made, with the estimate.
    Image datasets are split into index views of one training set, so their size does not
    grow with the number of clients.

    Raises:
        ValueError: the estimate exceeds the memory available (the message has both).
    """
    if config.dataset != "synthetic":
        return
    need = config.clients * _SYNTHETIC_BYTES_PER_CLIENT
    available = _available_memory()
    if available is not None and need > available:
        raise ValueError(
            f"clients={config.clients:,}: the synthetic data would need about "
            f"{need / 2**30:.1f} GiB (about 60 KiB per client), more than the "
            f"{available / 2**30:.1f} GiB of memory available; use fewer clients"
        )


def load_federation(config: RunConfig, key: Key) -> FederatedDataset:
    """The federated dataset ``config`` names, built from ``key``.

    Image datasets are split with ``key.fold_in("partition")``; every client is an index view
    onto the one training set. For the distillation algorithms (`DISTILLATION`) the public
    set comes first: ``config.public_size`` training examples drawn with
    ``key.fold_in("public")`` whose labels are dropped; the rest is partitioned.

    Raises:
        FileNotFoundError: the data directory or a file in it is missing.
        ValueError: a data file is malformed, the public set leaves no training data, the
            partition cannot be made, or the data would not fit in memory (`check_memory`).
    """
    check_memory(config)
    if config.dataset == "synthetic":
        return synthetic(config.synthetic_alpha, config.synthetic_beta, config.clients, key)
    train, test, classes = load_central(config)
    public = None
    if config.algorithm in DISTILLATION:
        held_out, private = _hold_out(train.y.shape[0], config.public_size, key.fold_in("public"))
        public = train.x[held_out]
        parts = split(config, train.y[private], key.fold_in("partition"))
        # Back to indices of the whole training set (``private`` is ascending: still sorted).
        parts = Partition(private[parts.indices], parts.offsets)
    else:
        parts = split(config, train.y, key.fold_in("partition"))
    clients = tuple(ClientData(train, parts.client(i)) for i in range(len(parts)))
    return FederatedDataset(
        name=config.dataset, clients=clients, test=test, num_classes=classes, public=public
    )


def _hold_out(n: int, size: int, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` of ``n`` indices drawn with ``key``, and the rest (both ascending)."""
    if size >= n:
        raise ValueError(
            f"public_size ({size}) must be smaller than the training set ({n} examples)"
        )
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.tensor(key.choice(n, size), dtype=torch.int64)] = True
    return mask.nonzero().flatten(), (~mask).nonzero().flatten()


def model_factory(config: RunConfig, data: FederatedDataset) -> ModelFactory:
    """The model ``config.model`` names; ``auto``: logreg on synthetic, mlp on MNIST, else cnn."""
    name = config.model
    if name == "auto":
        name = {"synthetic": "logreg", "mnist": "mlp"}.get(config.dataset, "cnn")
    builder = {"logreg": logistic_regression, "mlp": mlp, "cnn": cnn}[name]
    return functools.partial(builder, data.input_shape, data.num_classes)


def make_algorithm(
    config: RunConfig,
    model_fn: ModelFactory,
    num_clients: int,
    data: FederatedDataset | None = None,
) -> Algorithm[ClientData, Any]:
    """The algorithm ``config.algorithm`` names, with the config's hyperparameters.

    Raises:
        ValueError: a distillation algorithm without ``data`` that has a public set.
    """
    algorithm = _algorithm(config, model_fn, num_clients, data)
    dp = privacy_mechanism(config)
    if dp is None:
        return algorithm
    sampling: Literal["poisson", "fixed"] = (
        "poisson" if config.dp_sampling == "poisson" else "fixed"
    )
    return privatize(
        algorithm,
        dp,
        num_clients=num_clients,
        clients_per_round=config.clients_per_round,
        sampling=sampling,
    )


def privacy_mechanism(config: RunConfig) -> CentralDP | LocalDP | None:
    """The DP mechanism ``config.dp`` names, or None."""
    if config.dp is None:
        return None
    if config.dp == "local":
        return LocalDP(config.dp_clip, config.dp_noise_multiplier)
    adaptive = None
    if config.dp_adaptive_quantile is not None:
        adaptive = AdaptiveClipping(
            config.dp_adaptive_quantile, config.dp_clip_lr, config.dp_count_noise
        )
    return CentralDP(config.dp_clip, config.dp_noise_multiplier, adaptive)


def privacy_accountant(config: RunConfig, num_clients: int) -> Accountant | None:
    """The accountant of ``config``'s DP (sampling rate ``clients_per_round / clients``)."""
    dp = privacy_mechanism(config)
    if dp is None:
        return None
    rate = config.clients_per_round / num_clients
    return Accountant.for_dp(dp, rate, config.dp_delta, config.dp_accountant)


def _algorithm(
    config: RunConfig,
    model_fn: ModelFactory,
    num_clients: int,
    data: FederatedDataset | None,
) -> Algorithm[ClientData, Any]:
    local = LocalSGD(
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        transform=train_transform(config),
    )
    common: dict[str, Any] = {
        "num_clients": num_clients,
        "clients_per_round": config.clients_per_round,
        "local": local,
    }
    name = config.algorithm
    if name in DISTILLATION:
        return _distillation_algorithm(config, model_fn, data, common)
    if name == "fedavg" and config.clip_norm is None and config.dp is None:
        return fedavg(model_fn, **common)
    if name == "scaffold":
        lr = config.server_lr if config.server_lr is not None else DEFAULT_SERVER_LR[name]
        return scaffold(model_fn, **common, server_lr=lr)
    if name == "feddyn":
        return feddyn(model_fn, **common, alpha=config.feddyn_alpha)
    if name == "fednova":
        return fednova(model_fn, **common, momentum=config.local_momentum)
    if name == "fedavg":
        return compose(
            "fedavg", model_fn, **common, aggregate=Aggregate(clip_norm=config.clip_norm)
        )
    common["clip_norm"] = config.clip_norm
    lr = config.server_lr if config.server_lr is not None else DEFAULT_SERVER_LR.get(name, 1.0)
    adaptive: dict[str, Any] = {
        "server_lr": lr,
        "b1": config.beta1,
        "b2": config.beta2,
        "tau": config.tau,
    }
    if name == "fedprox":
        return fedprox(model_fn, **common, mu=config.mu)
    if name == "fedavgm":
        return fedavgm(model_fn, **common, server_lr=lr, beta=config.server_momentum)
    if name == "fedadam":
        return fedadam(model_fn, **common, **adaptive)
    if name == "fedyogi":
        return fedyogi(model_fn, **common, **adaptive)
    if name == "fedadagrad":
        return fedadagrad(model_fn, **common, server_lr=lr, tau=config.tau)
    if name == "fedmedian":
        return fedmedian(model_fn, **common)
    if name == "trimmed-mean":
        return trimmed_mean_fedavg(model_fn, **common, beta=config.trim_beta)
    return krum_fedavg(model_fn, **common, f=config.krum_f, m=config.krum_m)


def _distillation_algorithm(
    config: RunConfig,
    model_fn: ModelFactory,
    data: FederatedDataset | None,
    common: dict[str, Any],
) -> Algorithm[ClientData]:
    if data is None or data.public is None:
        raise ValueError(f"{config.algorithm} needs a federated dataset with a public set")
    shared: dict[str, Any] = {
        **common,
        "public": data.public,
        "num_classes": data.num_classes,
        "public_per_round": config.public_per_round,
        "distillation": Distillation(
            epochs=config.kd_epochs, batch_size=config.kd_batch_size, lr=config.kd_lr
        ),
    }
    if config.algorithm == "dsfl":
        return dsfl(model_fn, **shared, temperature=config.era_temperature)
    return scarlet(
        model_fn,
        **shared,
        cache_duration=config.cache_duration,
        exponent=config.era_exponent,
    )


def make_executor(config: RunConfig) -> Executor:
    """The executor ``config.executor`` names, with ``config.workers`` workers.

    ``vectorized`` trains ``config.chunk`` clients per step on ``config.device`` (one device),
    its chunk bounded by ``config.max_bytes``.

    Clients train on ``config.device`` (client ``k`` on the ``k % n``-th of its ``n``
    devices). Process workers use ``config.threads`` intra-op threads, like the driving
    process, so every executor computes the same bits.
    """
    devices = parse_devices(config.device)
    if config.executor == "threads":
        return Threads(config.workers, devices=devices)
    if config.executor == "processes":
        return Processes(
            config.workers,
            threads=config.threads,
            devices=devices,
            client_timeout=config.client_timeout,
        )
    if config.executor == "vectorized":
        return Vectorized(config.chunk, device=devices[0], max_bytes=config.max_bytes)
    if config.executor == "ray":
        return Ray(
            config.ray_address,
            config.workers,
            threads=config.threads,
            devices=devices,
            node_ip_address=config.ray_node_ip,
        )
    return Sequential(devices=devices)
