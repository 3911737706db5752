"""Whole simulations: a validated config in, the final state, reports and test metrics out.

Key layout of a run (``run_key = Key.from_seed(seed)``): ``run_key.fold_in("data")`` builds the
federated dataset, ``run_key.fold_in("init")`` the initial model, and round ``t`` uses
``run_key.fold_in(t)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from . import portable
from ._validators import Validator, finite_number, int_at_least, one_of, plus_zero
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
from .checkpoint import CheckpointWriter, check_fresh, load_checkpoint, locked, read_config
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
from .devices import check_device, cuda_determinism, parse_devices, to_device, uses_cuda
from .executors.base import Executor
from .executors.processes import Processes
from .executors.ray_pool import Ray
from .executors.sequential import Sequential
from .executors.threads import Threads
from .executors.vectorized import Vectorized
from .keys import Key
from .local import Distillation, LocalSGD, evaluate, evaluate_clients
from .models import cnn, logistic_regression, mlp
from .records import RoundReport, ServerState
from .reproducibility import ModelFactory, build_module, intra_op_threads
from .round import A, Algorithm, RoundFn, make_round, on_server
from .runner import Callback, EarlyStop, run_loop
from .tree import digest

__all__ = [
    "ALGORITHMS",
    "DATASETS",
    "DEFAULT_SERVER_LR",
    "DISTILLATION",
    "EXECUTORS",
    "MODELS",
    "PARTITIONS",
    "RESUMABLE_CHANGES",
    "UNCLIPPED",
    "RunConfig",
    "RunResult",
    "check_memory",
    "check_resumable",
    "config_dict",
    "config_from_dict",
    "load_central",
    "load_federation",
    "make_algorithm",
    "make_executor",
    "model_factory",
    "run_rounds",
    "simulate",
    "split",
    "train_transform",
]

ALGORITHMS = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "trimmed-mean",
    "krum",
    "scaffold",
    "feddyn",
    "fednova",
    "dsfl",
    "scarlet",
)
"""The algorithm names `RunConfig` and ``--algorithm`` accept."""
DISTILLATION = ("dsfl", "scarlet")
"""Algorithms that share soft labels on a public set held out of the training data."""
DEFAULT_SERVER_LR = {
    "fedavgm": 1.0,
    "fedadam": 0.01,
    "fedyogi": 0.01,
    "fedadagrad": 0.1,
    "scaffold": 1.0,
}
"""The server learning rate each server-optimizer algorithm uses when none is given."""
UNCLIPPED = ("scaffold", "feddyn", "fednova", "dsfl", "scarlet")
"""Algorithms with their own server arithmetic: update clipping (``clip_norm``) does not apply."""
DATASETS = ("synthetic", "mnist", "cifar10", "cifar100")
"""The dataset names `RunConfig` and ``--dataset`` accept."""
PARTITIONS = ("iid", "dirichlet", "shards", "inner-dirichlet")
"""How image datasets can be split over clients (``--partition``)."""
EXECUTORS = ("sequential", "threads", "processes", "ray", "vectorized")
"""The executor names `RunConfig` and ``--executor`` accept."""
MODELS = ("auto", "logreg", "mlp", "cnn")
"""The model names `RunConfig` and ``--model`` accept (``auto`` picks one per dataset)."""

# Upper bounds of the numeric settings (the CLI's --help and docs/cli.md show them): far above
# any real run, low enough that a typo (2147483648 clients) fails at parse time, not hours in.
_COUNT = 10_000_000  # clients, rounds, batch sizes, chunk, public samples, ...
_EPOCHS = 10_000
_RATE = 1e4  # learning rates and regularisation weights
_WORKERS = 4096
_THREADS = 1024


def _resolve_auto(value: str) -> str:
    # Stored resolved, so that a checkpoint records the devices the run really used and a
    # resume elsewhere is compared against them, not against the word "auto". Anything else
    # (a wrong type too) passes through to the validator.
    if value == "auto":
        return ",".join(str(d) for d in parse_devices("auto"))
    return value


def _devices_field(parse: Callable[[str], object]) -> Validator:
    """A device-string field checked by ``parse`` (its message prefixed with the field)."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attribute.name} must be a str, got {type(value).__name__}")
        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None

    return check


def _optional_text(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


@attrs.frozen(kw_only=True)
class RunConfig:
    """Everything that determines a simulation; the same config gives the same bits.

    The defaults are the FedProx paper's Synthetic(1, 1) setting (30 clients, 10 per round,
    batch 10, lr 0.01, multinomial logistic regression).

    ``device`` is where clients train (``cpu``, ``cuda``, ``cuda:0,cuda:1`` or ``auto``: every
    visible GPU, else the CPU, stored as the list it resolves to); ``server_device`` is where
    the global model lives, is aggregated and evaluated. Both must exist on the machine that
    runs the config. ``portable`` pins the CPU kernels to their baseline paths
    (`blazefl_fn.portable`): the same bits on x86-64 CPUs of any model, at a cost in speed
    (CPU devices only).

    Raises:
        ValueError: on construction, for any out-of-range value (the message names it).
    """

    algorithm: str = attrs.field(default="fedavg", validator=one_of(ALGORITHMS))
    dataset: str = attrs.field(default="synthetic", validator=one_of(DATASETS))
    data_dir: str | None = None
    model: str = attrs.field(default="auto", validator=one_of(MODELS))
    clients: int = attrs.field(default=30, validator=int_at_least(1, _COUNT))
    clients_per_round: int = attrs.field(default=10, validator=int_at_least(1, _COUNT))
    rounds: int = attrs.field(default=100, validator=int_at_least(0, _COUNT))
    local_epochs: int = attrs.field(default=1, validator=int_at_least(1, _EPOCHS))
    batch_size: int = attrs.field(default=10, validator=int_at_least(1, _COUNT))
    lr: float = attrs.field(default=0.01, validator=finite_number(positive=True, high=_RATE))
    seed: int = attrs.field(default=0, validator=int_at_least(0, 2**128 - 1))
    executor: str = attrs.field(default="sequential", validator=one_of(EXECUTORS))
    workers: int = attrs.field(default=2, validator=int_at_least(1, _WORKERS))
    threads: int = attrs.field(default=1, validator=int_at_least(1, _THREADS))
    device: str = attrs.field(
        default="cpu", converter=_resolve_auto, validator=_devices_field(parse_devices)
    )
    server_device: str = attrs.field(default="cpu", validator=_devices_field(check_device))
    ray_address: str | None = attrs.field(default=None, validator=_optional_text)
    ray_node_ip: str | None = attrs.field(default=None, validator=_optional_text)
    client_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, high=1e6))
    )
    portable: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    chunk: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(int_at_least(1, _COUNT))
    )
    max_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(int_at_least(1, 2**62))
    )
    eval_every: int = attrs.field(default=1, validator=int_at_least(1, _COUNT))
    synthetic_alpha: float = attrs.field(
        default=1.0, converter=plus_zero, validator=finite_number(positive=False, high=1e3)
    )
    synthetic_beta: float = attrs.field(
        default=1.0, converter=plus_zero, validator=finite_number(positive=False, high=1e3)
    )
    partition: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of(PARTITIONS))
    )
    alpha: float = attrs.field(default=0.5, validator=finite_number(positive=True, high=1e6))
    shards_per_client: int = attrs.field(default=2, validator=int_at_least(1, _COUNT))
    augment: bool = False
    target_accuracy: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, high=1))
    )
    eval_clients: bool = False
    skip_nonfinite: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    mu: float = attrs.field(
        default=0.01, converter=plus_zero, validator=finite_number(positive=False, high=_RATE)
    )
    server_lr: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, high=_RATE))
    )
    server_momentum: float = attrs.field(
        default=0.9, converter=plus_zero, validator=finite_number(positive=False, below=1)
    )
    beta1: float = attrs.field(
        default=0.9, converter=plus_zero, validator=finite_number(positive=False, below=1)
    )
    beta2: float = attrs.field(
        default=0.99, converter=plus_zero, validator=finite_number(positive=False, below=1)
    )
    tau: float = attrs.field(default=1e-3, validator=finite_number(positive=True, high=_RATE))
    trim_beta: float = attrs.field(
        default=0.1, converter=plus_zero, validator=finite_number(positive=False, below=0.5)
    )
    krum_f: int = attrs.field(default=1, validator=int_at_least(0, _COUNT))
    krum_m: int = attrs.field(default=1, validator=int_at_least(1, _COUNT))
    clip_norm: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, high=1e12))
    )
    feddyn_alpha: float = attrs.field(
        default=0.01, validator=finite_number(positive=True, high=_RATE)
    )
    local_momentum: float = attrs.field(
        default=0.0, converter=plus_zero, validator=finite_number(positive=False, below=1)
    )
    public_size: int = attrs.field(default=10000, validator=int_at_least(1, _COUNT))
    public_per_round: int = attrs.field(default=1000, validator=int_at_least(1, _COUNT))
    era_temperature: float = attrs.field(
        default=0.1, validator=finite_number(positive=True, high=1e6)
    )
    cache_duration: int = attrs.field(default=10, validator=int_at_least(0, _COUNT))
    era_exponent: float = attrs.field(default=2.0, validator=finite_number(positive=True, high=1e3))
    kd_epochs: int = attrs.field(default=1, validator=int_at_least(1, _EPOCHS))
    kd_batch_size: int = attrs.field(default=100, validator=int_at_least(1, _COUNT))
    kd_lr: float = attrs.field(default=0.1, validator=finite_number(positive=True, high=_RATE))

    def __attrs_post_init__(self) -> None:
        if self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})"
            )
        if self.algorithm == "krum":
            if self.clients_per_round <= 2 * self.krum_f + 2:
                raise ValueError(
                    f"krum with krum_f={self.krum_f} needs clients_per_round > "
                    f"2*krum_f+2 = {2 * self.krum_f + 2}, got {self.clients_per_round}"
                )
            if self.krum_m > self.clients_per_round:
                raise ValueError(
                    f"krum_m ({self.krum_m}) exceeds clients_per_round ({self.clients_per_round})"
                )
        if self.clip_norm is not None and self.algorithm in UNCLIPPED:
            raise ValueError(
                f"clip_norm clips updates of the FedAvg family; {self.algorithm} aggregates "
                "by its own rule, so it does not apply"
            )
        if self.local_momentum != 0.0 and self.algorithm != "fednova":
            raise ValueError(
                f"local_momentum applies to fednova (its normaliser accounts for it), not to "
                f"{self.algorithm}"
            )
        if self.dataset != "synthetic" and self.data_dir is None:
            raise ValueError(
                f"dataset {self.dataset!r} needs a data directory (data_dir / --data-dir)"
            )
        if self.dataset == "synthetic" and self.model == "cnn":
            raise ValueError(
                "model 'cnn' needs image inputs; the synthetic dataset has 60 features "
                "(use logreg or mlp)"
            )
        if self.dataset == "synthetic" and self.partition is not None:
            raise ValueError(
                "the synthetic dataset is partitioned by its generator; partition applies to "
                "mnist, cifar10 and cifar100"
            )
        if self.algorithm in DISTILLATION:
            if self.dataset == "synthetic":
                raise ValueError(
                    f"{self.algorithm} distills on a public set held out of the training data; "
                    f"use mnist, cifar10 or cifar100, not synthetic"
                )
            if self.public_per_round > self.public_size:
                raise ValueError(
                    f"public_per_round ({self.public_per_round}) exceeds public_size "
                    f"({self.public_size})"
                )
        if self.client_timeout is not None and self.executor != "processes":
            raise ValueError(
                f"client_timeout applies to the processes executor, not to {self.executor!r} "
                "(a thread cannot be stopped; sequential runs in this process)"
            )
        if self.executor != "vectorized" and (self.chunk, self.max_bytes) != (None, None):
            raise ValueError(
                f"chunk and max_bytes apply to the vectorized executor, not to {self.executor!r}"
            )
        if self.portable and uses_cuda(
            (*parse_devices(self.device), check_device(self.server_device))
        ):
            raise ValueError(
                "portable numerics pin CPU kernels only; a run on "
                f"device={self.device!r} server_device={self.server_device!r} cannot be portable"
            )
        if self.executor == "vectorized" and "," in self.device:
            raise ValueError(f"the vectorized executor trains on one device, got {self.device!r}")
        if self.augment and not self.dataset.startswith("cifar"):
            raise ValueError(
                f"augment (random crop + horizontal flip) applies to cifar10 and cifar100, "
                f"not to {self.dataset!r}"
            )


@attrs.frozen
class RunResult:
    """The outcome of `simulate`."""

    state: ServerState
    reports: tuple[RoundReport, ...]
    accuracy: float
    loss: float
    params_sha256: str
    wall_seconds: float
    metrics: Mapping[str, float] = attrs.field(factory=dict[str, float])
    stopped_early: bool = False
    numerics: Mapping[str, object] = attrs.field(factory=dict[str, object])


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
    if name == "fedavg" and config.clip_norm is None:
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


def run_rounds(
    round_fn: RoundFn[A],
    state: ServerState[A],
    run_key: Key,
    rounds: int,
    on_round: Callable[[ServerState[A], RoundReport], None] | None = None,
) -> tuple[ServerState[A], tuple[RoundReport, ...]]:
    """Run rounds until ``state.round == rounds``, round ``t`` with key ``run_key.fold_in(t)``.

    ``rounds`` is the total the run should have completed, as in `run_loop`: a state restored
    at round ``t`` runs ``rounds - t`` more. Because the key of a round depends only on its
    index, a run that stops after round ``t`` and continues from that state gives the same bits
    as an uninterrupted one.

    Raises:
        ValueError: ``rounds`` is below ``state.round``.

    Examples:
        >>> import blazefl_fn as fl
        >>> config = RunConfig(clients=4, clients_per_round=2)
        >>> key = fl.Key.from_seed(0)
        >>> data = load_federation(config, key.fold_in("data"))
        >>> algo = fl.fedavg(model_factory(config, data), num_clients=4, clients_per_round=2,
        ...                  local=fl.LocalSGD())
        >>> with fl.Sequential() as ex:
        ...     round_fn = fl.make_round(algo, data.clients, ex)
        ...     state, reports = run_rounds(round_fn, algo.init(key), key, rounds=2)
        ...     state, more = run_rounds(round_fn, state, key, rounds=3)  # one more
        >>> state.round, len(reports), len(more)
        (3, 2, 1)
    """
    if rounds < state.round:
        raise ValueError(f"rounds={rounds} is below the state's completed rounds {state.round}")
    reports: list[RoundReport] = []
    while state.round < rounds:
        state, report = round_fn(state, run_key.fold_in(state.round))
        reports.append(report)
        if on_round is not None:
            on_round(state, report)
    return state, tuple(reports)


RESUMABLE_CHANGES = frozenset(
    {
        "executor",
        "workers",
        "rounds",
        "eval_every",
        "target_accuracy",
        "eval_clients",
        "ray_address",
        "ray_node_ip",
        # Compared by `check_resumable` as part of how the executor rounds (`_arithmetic`).
        "chunk",
        "max_bytes",
        "client_timeout",
    }
)
"""Settings a checkpoint may be resumed with different values of: how a run is executed or
observed. They do not change the bits, except that a vectorized run's chunking (``executor``,
``chunk``, ``max_bytes``) is checked separately, since it groups the arithmetic."""


def _arithmetic(config: RunConfig) -> str:
    """How clients' float arithmetic is grouped: the per-client executors all agree bit for
    bit; vectorised training rounds otherwise, and may differ by chunk size."""
    if config.executor != "vectorized":
        return "per-client"
    return f"executor='vectorized' chunk={config.chunk!r} max_bytes={config.max_bytes!r}"


def config_dict(config: RunConfig) -> dict[str, Any]:
    """``config`` as a JSON-serialisable dict (what checkpoints store)."""
    return attrs.asdict(config)


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """The `RunConfig` a `config_dict` describes.

    Raises:
        ValueError: an unknown field or an invalid value.
    """
    known = {f.name for f in attrs.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    missing = sorted(known - set(values))
    if missing:
        raise ValueError(f"config fields {missing} are missing")
    return RunConfig(**values)


def check_resumable(stored: RunConfig, requested: RunConfig) -> None:
    """Refuse to continue a run of ``stored`` under a ``requested`` config that changes its bits.

    Raises:
        ValueError: a field outside `RESUMABLE_CHANGES` differs (the message names each).
    """
    old, new = config_dict(stored), config_dict(requested)
    diffs = [
        f"{name}={old[name]!r} (requested {new[name]!r})"
        for name in old
        if name not in RESUMABLE_CHANGES and old[name] != new[name]
    ]
    if _arithmetic(stored) != _arithmetic(requested):
        diffs.append(
            f"{_arithmetic(stored)} (requested {_arithmetic(requested)}): vectorised training "
            "rounds differently from per-client training"
        )
    if diffs:
        raise ValueError(
            "the checkpoint was written by a run with other settings: " + ", ".join(diffs)
        )


@attrs.frozen
class _Evaluator:
    """Test (and optionally per-client) metrics; built on the server's device."""

    template: torch.nn.Module
    test: TensorDataset
    clients: tuple[ClientData, ...] | None

    def __call__(self, state: ServerState) -> dict[str, float]:
        metrics = evaluate(self.template, state.params, self.test)
        if self.clients is not None:
            metrics.update(evaluate_clients(self.template, state.params, self.clients))
        return metrics


def simulate(
    config: RunConfig,
    callbacks: Sequence[Callback] = (),
    *,
    resume: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    overwrite: bool = False,
) -> RunResult:
    """Run the simulation ``config`` describes, or continue one from a checkpoint.

    Args:
        config: the run's settings.
        callbacks: observers of the run loop (progress, metrics log, ...); see `Callback`.
        resume: a checkpoint (directory or file) to continue from; its config must agree
            with ``config`` except for `RESUMABLE_CHANGES`. The continued run gives the same
            bits as an uninterrupted one.
        checkpoint_dir: write a checkpoint here every ``checkpoint_every`` rounds, after the
            last round, and on KeyboardInterrupt.
        checkpoint_every: rounds between checkpoints (>= 1).
        overwrite: let a run that does not resume from ``checkpoint_dir``'s checkpoint replace
            it (otherwise refused).

    Raises:
        ValueError: a bad setting, a malformed data file, or a corrupt or mismatching
            checkpoint.
        FileNotFoundError: a data file or the checkpoint is missing.
        FileExistsError: ``checkpoint_dir`` holds a checkpoint this run would replace.
        blazefl_fn.OutputLockedError: another process writes ``checkpoint_dir``; it stays
            locked (``flock``) while this run lasts.

    Examples:
        >>> result = simulate(RunConfig(rounds=2, clients=5, clients_per_round=2))
        >>> len(result.reports), len(result.params_sha256)
        (2, 64)
    """
    if isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if config.portable:
        portable.enable()  # before the first kernel of the run
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if checkpoint_dir is not None:
            stack.enter_context(locked(checkpoint_dir))
            check_fresh(checkpoint_dir, resume, overwrite=overwrite)
        if resume is not None:
            check_resumable(config_from_dict(read_config(resume)), config)
        # On CUDA the server's stages and evaluation run with deterministic kernels too.
        cuda = uses_cuda((*parse_devices(config.device), check_device(config.server_device)))
        stack.enter_context(intra_op_threads(config.threads))
        stack.enter_context(cuda_determinism(cuda))
        return _simulate(config, callbacks, resume, checkpoint_dir, checkpoint_every, start)


def _simulate(
    config: RunConfig,
    callbacks: Sequence[Callback],
    resume: str | os.PathLike[str] | None,
    checkpoint_dir: str | os.PathLike[str] | None,
    checkpoint_every: int,
    start: float,
) -> RunResult:
    run_key = Key.from_seed(config.seed)
    data = load_federation(config, run_key.fold_in("data"))
    model_fn = model_factory(config, data)
    server = check_device(config.server_device)
    algorithm = on_server(make_algorithm(config, model_fn, len(data.clients), data), server)
    if config.skip_nonfinite:
        algorithm = attrs.evolve(algorithm, nonfinite="skip")
    template = build_module(model_fn, run_key.fold_in("template"))
    state = algorithm.init(run_key.fold_in("init"))
    if resume is not None:
        state = load_checkpoint(resume, aux_template=state.aux, params_template=state.params).state
        if state.round > config.rounds:
            raise ValueError(
                f"the checkpoint has completed {state.round} rounds, more than rounds="
                f"{config.rounds}"
            )
    state = to_device(state, server)
    evaluator = to_device(
        _Evaluator(template, data.test, data.clients if config.eval_clients else None), server
    )
    observers = list(callbacks)
    if checkpoint_dir is not None:
        observers.append(
            CheckpointWriter(
                checkpoint_dir,
                checkpoint_every,
                config_dict(config),
                numerics=portable.numerics(),
            )
        )
    early_stop = (
        None if config.target_accuracy is None else EarlyStop("accuracy", config.target_accuracy)
    )
    with make_executor(config) as executor:
        loop = run_loop(
            make_round(algorithm, data.clients, executor),
            state,
            run_key,
            config.rounds,
            evaluate=evaluator,
            eval_every=config.eval_every,
            callbacks=observers,
            early_stop=early_stop,
        )
    return RunResult(
        state=loop.state,
        reports=loop.reports,
        accuracy=loop.metrics.get("accuracy", math.nan),
        loss=loop.metrics.get("loss", math.nan),
        params_sha256=digest(loop.state.params),
        wall_seconds=time.perf_counter() - start,
        metrics=dict(loop.metrics),
        stopped_early=loop.stopped_early,
        numerics=portable.numerics(),
    )
