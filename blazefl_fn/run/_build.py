"""What a `RunConfig` builds: the federation, the model factory, the algorithm and the
executor (re-exported by `blazefl_fn.run.simulate`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import attrs
import torch

from ..algorithms.compose import (
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
from ..algorithms.ditto import ditto
from ..algorithms.dsfl import dsfl
from ..algorithms.fedavg import fedavg
from ..algorithms.feddyn import feddyn
from ..algorithms.fednova import fednova
from ..algorithms.fedper import fedper
from ..algorithms.fedrep import fedrep
from ..algorithms.scaffold import scaffold
from ..algorithms.scarlet import scarlet
from ..client.distillation import Distillation
from ..client.training import LocalSGD
from ..data.cifar import load_cifar10, load_cifar100
from ..data.datasets import ClientData, FederatedDataset, TensorDataset, hold_out_clients
from ..data.mnist import load_mnist
from ..data.partition import Partition, dirichlet, iid, inner_dirichlet, shards
from ..data.synthetic import SyntheticClients, synthetic
from ..data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    Transform,
    cifar_train_transform,
    normalize,
)
from ..executors.base import Executor, threads_of
from ..executors.devices import parse_devices
from ..executors.processes import Processes
from ..executors.ray_pool import Ray
from ..executors.sequential import Sequential
from ..executors.threads import Threads
from ..executors.vectorized import Vectorized
from ..keys import Key
from ..models import ModelFactory, cnn, logistic_regression, mlp
from ..privacy.mechanisms import AdaptiveClipping, CentralDP, LocalDP
from ..privacy.privatize import Accountant, privatize
from ..round import Algorithm
from ..server.client_state import StoreOptions
from .config import DEFAULT_SERVER_LR, DISTILLATION, PERSONAL, STATEFUL, RunConfig


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


SYNTHETIC_EAGER_CLIENTS = 10_000  # also `config._EAGER_CLIENTS`
"""The most synthetic clients a run generates up front; a larger federation is lazy.

A lazy federation's clients are a `blazefl_fn.data.synthetic.SyntheticClients` (each client is
generated when a round samples it), and its test set is the held-out rows of its first this
many clients. Up to this size a run's data, train and test, is what
``synthetic(alpha, beta, clients, key)`` makes."""


def load_federation(config: RunConfig, key: Key) -> FederatedDataset:
    """The federated dataset ``config`` names, built from ``key``, with each client's held-out
    split (`hold_out_clients`, drawn with ``key.fold_in("client_test")``) when
    ``config.client_test_fraction`` is set.

    Raises:
        FileNotFoundError: the data directory or a file in it is missing.
        ValueError: a data file is malformed, the public set leaves no training data, the
            partition cannot be made.
    """
    data = _load_federation(config, key)
    if config.client_test_fraction is None:
        return data
    return hold_out_clients(data, config.client_test_fraction, key.fold_in("client_test"))


def _load_federation(config: RunConfig, key: Key) -> FederatedDataset:
    """The federated dataset ``config`` names, built from ``key``.

    A synthetic federation of more than `SYNTHETIC_EAGER_CLIENTS` clients is lazy: its
    clients are generated when rounds sample them, so its memory does not grow with
    ``config.clients``; its test set is the held-out rows of the first
    `SYNTHETIC_EAGER_CLIENTS` clients. Smaller ones are generated up front.

    Image datasets are split with ``key.fold_in("partition")``; every client is an index view
    onto the one training set. For the distillation algorithms (`DISTILLATION`) the public
    set comes first: ``config.public_size`` training examples drawn with
    ``key.fold_in("public")`` whose labels are dropped; the rest is partitioned.

    Raises:
        FileNotFoundError: the data directory or a file in it is missing.
        ValueError: a data file is malformed, the public set leaves no training data, the
            partition cannot be made.
    """
    if config.dataset == "synthetic":
        return synthetic(
            config.synthetic_alpha,
            config.synthetic_beta,
            config.clients,
            key,
            lazy=config.clients > SYNTHETIC_EAGER_CLIENTS,
            test_clients=min(config.clients, SYNTHETIC_EAGER_CLIENTS),
        )
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


def evaluation_clients(data: FederatedDataset) -> Sequence[ClientData]:
    """The clients ``config.eval_clients`` evaluates each time: each client's held-out split
    where the federation has them; else every client's training data, except in a lazy
    synthetic federation, where it is the first `SYNTHETIC_EAGER_CLIENTS` (those whose
    held-out rows form the test set), each generated as it is evaluated."""
    if data.client_tests is not None:
        return data.client_tests
    clients = data.clients
    if isinstance(clients, SyntheticClients):
        return clients.first(min(len(clients), SYNTHETIC_EAGER_CLIENTS))
    return clients


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
    """The model ``config.model`` names (`RunConfig.model_name` resolves ``auto``)."""
    builder = {"logreg": logistic_regression, "mlp": mlp, "cnn": cnn}[config.model_name]
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
        augment=train_transform(config),
        drop_last=config.drop_last,
    )
    common: dict[str, Any] = {
        "num_clients": num_clients,
        "clients_per_round": config.clients_per_round,
        "local": local,
    }
    name = config.algorithm
    if name in STATEFUL:
        common["store"] = client_store_options(config)
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
    if name in PERSONAL:
        return _personal_algorithm(config, model_fn, common)
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


def _personal_algorithm(
    config: RunConfig, model_fn: ModelFactory, common: dict[str, Any]
) -> Algorithm[ClientData, Any]:
    head = None if config.head is None else config.head.split(",")
    if config.algorithm == "ditto":
        personal = None
        if config.personal_epochs is not None:
            personal = attrs.evolve(common["local"], epochs=config.personal_epochs)
        return ditto(model_fn, **common, lam=config.ditto_lambda, personal=personal)
    if config.algorithm == "fedrep":
        return fedrep(model_fn, **common, head_epochs=config.head_epochs, head=head)
    return fedper(model_fn, **common, head=head)


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


def client_store_options(config: RunConfig) -> StoreOptions:
    """Where a stateful algorithm keeps its clients' state (`StoreOptions`).

    Raises:
        ValueError: ``config.client_state_dir`` is not a directory (checked here, when the
            run starts, so that a resumed run may name another one).
    """
    where = config.client_state_dir
    if where is not None and not os.path.isdir(where):
        raise ValueError(f"client_state_dir {where!r} is not a directory")
    memory_mb = config.client_state_memory_mb
    return StoreOptions(
        memory_bytes=StoreOptions().memory_bytes if memory_mb is None else memory_mb * 2**20,
        spill_dir=config.client_state_dir,
    )


def check_executor(config: RunConfig, executor: Executor) -> None:
    """Refuse ``executor`` for ``config`` where it would not compute ``config``'s bits.

    An executor given to `simulate` stands in for the one ``config`` names. Every per-client
    executor computes the same bits at the same intra-op thread count and on the same
    devices; `Vectorized` computes bits of its own.

    Raises:
        ValueError: ``executor`` runs at another thread count or on other devices than
            ``config`` says, or is `Vectorized` where ``config.executor`` is not (or the
            other way round).
    """
    vectorized = isinstance(executor, Vectorized)
    if vectorized != (config.executor == "vectorized"):
        raise ValueError(
            f"executor {executor!r} cannot stand in for executor={config.executor!r}: "
            "Vectorized computes bits of its own; give both as vectorized or neither"
        )
    if (threads := threads_of(executor)) != config.threads:
        raise ValueError(
            f"executor {executor!r} runs at threads={threads}, the config at "
            f"threads={config.threads}: the bits depend on it; make them agree"
        )
    devices: object = getattr(executor, "devices", None)
    if vectorized:
        devices = (executor.device,)
    if devices is None:
        return
    given = tuple(torch.device(d) for d in cast(Sequence[str | torch.device], devices))
    # As resolved here (`parse_devices`), or as spelled, which `Ray` keeps for its actors to
    # resolve ("cuda" stays "cuda").
    accepted = {parse_devices(config.device)}
    if config.device.strip() != "auto":
        accepted.add(tuple(torch.device(part.strip()) for part in config.device.split(",")))
    if given not in accepted:
        raise ValueError(
            f"executor {executor!r} trains on {[str(d) for d in given]}, the config on "
            f"device={config.device!r}; make them agree"
        )


def make_executor(config: RunConfig) -> Executor:
    """The executor ``config.executor`` names, with ``config.workers`` workers.

    ``vectorized`` trains ``config.chunk`` clients per step on ``config.device`` (one device),
    its chunk bounded by ``config.max_bytes``.

    Clients train on ``config.device`` (client ``k`` on the ``k % n``-th of its ``n``
    devices). Every executor runs client work (and each round's server side) at
    ``config.threads`` intra-op threads, so every executor computes the same bits.
    """
    devices = parse_devices(config.device)
    if config.executor == "threads":
        return Threads(config.workers, devices=devices, threads=config.threads)
    if config.executor == "processes":
        return Processes(
            config.workers,
            threads=config.threads,
            devices=devices,
            client_timeout=config.client_timeout,
        )
    if config.executor == "vectorized":
        return Vectorized(
            config.chunk, device=devices[0], max_bytes=config.max_bytes, threads=config.threads
        )
    if config.executor == "ray":
        return Ray(
            config.ray_address,
            config.workers,
            threads=config.threads,
            devices=devices,
            node_ip_address=config.ray_node_ip,
            client_timeout=config.client_timeout,
        )
    return Sequential(devices=devices, threads=config.threads)
