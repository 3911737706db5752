"""A run's configuration: `RunConfig`, the options it accepts and their bounds (re-exported by
`blazefl_fn.run.simulate`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import attrs

from .._validators import (
    Validator,
    check_ip_address,
    check_ray_address,
    finite_number,
    int_at_least,
    noise_multiplier,
    one_of,
    plus_zero,
)
from ..executors.devices import check_device, parse_devices, uses_cuda
from ..privacy.mechanisms import AdaptiveClipping, CentralDP

__all__ = [
    "ALGORITHMS",
    "DATASETS",
    "DEFAULT_SERVER_LR",
    "DISTILLATION",
    "DP_CENTRAL",
    "DP_LOCAL",
    "DP_MODES",
    "EXECUTORS",
    "MODELS",
    "PARTITIONS",
    "PERSONAL",
    "STATEFUL",
    "UNCLIPPED",
    "RunConfig",
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
    "ditto",
    "fedrep",
    "fedper",
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
PERSONAL = ("ditto", "fedrep", "fedper")
"""Personalised algorithms: each client keeps a personal model (Ditto) or head (FedRep, FedPer)."""
UNCLIPPED = ("scaffold", "feddyn", "fednova", "dsfl", "scarlet", *PERSONAL)
"""Algorithms with their own server arithmetic: update clipping (``clip_norm``) does not apply."""
STATEFUL = ("scaffold", "feddyn", "dsfl", "scarlet", *PERSONAL)
"""Algorithms whose clients keep state between rounds (in a `ClientStore`)."""
DATASETS = ("synthetic", "mnist", "cifar10", "cifar100")
"""The dataset names `RunConfig` and ``--dataset`` accept."""
PARTITIONS = ("iid", "dirichlet", "shards", "inner-dirichlet")
"""How image datasets can be split over clients (``--partition``)."""
EXECUTORS = ("sequential", "threads", "processes", "ray", "vectorized")
"""The executor names `RunConfig` and ``--executor`` accept."""
MODELS = ("auto", "logreg", "mlp", "cnn")
"""The model names `RunConfig` and ``--model`` accept (``auto`` picks one per dataset)."""
DP_MODES = ("central", "local")
"""Client-level differential privacy (``--dp``): the server noises the sum, or each client."""
DP_CENTRAL = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""Algorithms central DP applies to: the FedAvg family with the (private) mean."""
DP_LOCAL = (*DP_CENTRAL, "fedmedian", "trimmed-mean", "krum")
"""Algorithms local DP applies to: any aggregator is post-processing of noised updates."""

# Upper bounds of the numeric settings (the CLI's --help and docs/cli.md show them): far above
# any real run, low enough that a typo (2147483648 clients) fails at parse time, not hours in.
_COUNT = 10_000_000  # clients, rounds, batch sizes, chunk, public samples, ...
_EPOCHS = 10_000
_RATE = 1e4  # learning rates and regularisation weights
_WORKERS = 4096
_EAGER_CLIENTS = 10_000  # `blazefl_fn.run.simulate.SYNTHETIC_EAGER_CLIENTS`
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


def _optional_checked(check: Callable[[str, str], str]) -> Validator:
    """A text field that is None or passes ``check(name, value)``."""

    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        _optional_text(instance, attribute, value)
        if value is not None:
            check(attribute.name, cast(str, value))

    return validate


# Each dataset's input shape and class count, to check a model's layer names before any data.
_SHAPES = {
    "synthetic": ((60,), 10), "mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}  # fmt: skip


def _head_patterns(name: str, value: str) -> str:
    parts = value.split(",")
    if any(not p.strip().strip(".") or p != p.strip() for p in parts):
        raise ValueError(
            f"{name} must be parameter names or module prefixes separated by commas, got {value!r}"
        )
    return value


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
    (CPU devices only). ``client_state_memory_mb`` and ``client_state_dir`` set where the
    stateful algorithms (`STATEFUL`) keep their clients' state: that much in memory (default
    1024 MiB), the rest in files under that directory (default: the system's temporary one;
    it must exist when the run starts, which a resume may point elsewhere); they never change
    the bits.

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
    drop_last: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    lr: float = attrs.field(default=0.01, validator=finite_number(positive=True, high=_RATE))
    seed: int = attrs.field(default=0, validator=int_at_least(0, 2**128 - 1))
    executor: str = attrs.field(default="sequential", validator=one_of(EXECUTORS))
    workers: int = attrs.field(default=2, validator=int_at_least(1, _WORKERS))
    threads: int = attrs.field(default=1, validator=int_at_least(1, _THREADS))
    device: str = attrs.field(
        default="cpu", converter=_resolve_auto, validator=_devices_field(parse_devices)
    )
    server_device: str = attrs.field(default="cpu", validator=_devices_field(check_device))
    ray_address: str | None = attrs.field(
        default=None, validator=_optional_checked(check_ray_address)
    )
    ray_node_ip: str | None = attrs.field(
        default=None, validator=_optional_checked(check_ip_address)
    )
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
    client_test_fraction: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, below=1))
    )
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
    dp: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of(DP_MODES))
    )
    dp_clip: float = attrs.field(default=1.0, validator=finite_number(positive=True, high=1e12))
    dp_noise_multiplier: float = attrs.field(
        default=1.0, converter=plus_zero, validator=noise_multiplier()
    )
    dp_delta: float = attrs.field(default=1e-5, validator=finite_number(positive=True, below=1))
    dp_target_epsilon: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, high=1e6))
    )
    dp_accountant: str = attrs.field(default="rdp", validator=one_of(("rdp", "prv")))
    dp_sampling: str = attrs.field(default="poisson", validator=one_of(("poisson", "fixed")))
    dp_adaptive_quantile: float | None = attrs.field(
        default=None,
        converter=attrs.converters.optional(plus_zero),
        validator=attrs.validators.optional(finite_number(positive=False, high=1)),
    )
    dp_clip_lr: float = attrs.field(default=0.2, validator=finite_number(positive=True, high=100))
    dp_count_noise: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_number(positive=True, high=1e9))
    )
    ditto_lambda: float = attrs.field(
        default=0.1, converter=plus_zero, validator=finite_number(positive=False, high=_RATE)
    )
    personal_epochs: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(int_at_least(1, _EPOCHS))
    )
    head_epochs: int = attrs.field(default=10, validator=int_at_least(1, _EPOCHS))
    head: str | None = attrs.field(default=None, validator=_optional_checked(_head_patterns))
    client_state_memory_mb: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(int_at_least(0, _COUNT))
    )
    client_state_dir: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )

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
        self._check_client_state()
        self._check_personal()
        if self.client_test_fraction is not None and self.clients > _EAGER_CLIENTS:
            raise ValueError(
                f"client_test_fraction needs the clients made up front; a synthetic federation "
                f"of {self.clients} clients (> {_EAGER_CLIENTS}) is lazy"
            )
        if self.client_timeout is not None and self.executor not in ("processes", "ray"):
            raise ValueError(
                f"client_timeout applies to the processes and ray executors, not to "
                f"{self.executor!r} (a thread cannot be stopped; sequential runs in this process)"
            )
        if self.executor != "ray" and (self.ray_address, self.ray_node_ip) != (None, None):
            raise ValueError(
                f"ray_address and ray_node_ip apply to the ray executor, not to {self.executor!r}"
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
        self._check_dp()
        if self.augment and not self.dataset.startswith("cifar"):
            raise ValueError(
                f"augment (random crop + horizontal flip) applies to cifar10 and cifar100, "
                f"not to {self.dataset!r}"
            )

    def _check_dp(self) -> None:
        defaults = {f.name: f.default for f in attrs.fields(RunConfig) if f.name.startswith("dp_")}
        if self.dp is None:
            changed = [n for n, d in defaults.items() if getattr(self, n) != d]
            if changed:
                raise ValueError(
                    f"{changed[0]}={getattr(self, changed[0])!r} applies with dp ('central' or "
                    "'local'), which is unset"
                )
            return
        allowed = DP_CENTRAL if self.dp == "central" else DP_LOCAL
        if self.algorithm not in allowed:
            raise ValueError(
                f"{self.dp} DP applies to {', '.join(allowed)}; not to {self.algorithm!r}"
            )
        if self.clip_norm is not None:
            raise ValueError(
                f"clip_norm={self.clip_norm!r} does not apply with dp: it clips updates itself "
                "(dp_clip)"
            )
        adaptive = ("dp_adaptive_quantile", "dp_clip_lr", "dp_count_noise")
        changed = [n for n in adaptive if getattr(self, n) != defaults[n]]
        if self.dp == "local" and changed:
            raise ValueError(
                f"{changed[0]}={getattr(self, changed[0])!r}: adaptive clipping is central "
                "DP's, not local DP's"
            )
        if self.dp_adaptive_quantile is None and changed:
            raise ValueError(
                f"{changed[0]}={getattr(self, changed[0])!r} applies with dp_adaptive_quantile, "
                "which is unset"
            )
        if self.dp_target_epsilon is not None and self.dp_noise_multiplier == 0:
            raise ValueError(
                f"dp_target_epsilon={self.dp_target_epsilon!r} with dp_noise_multiplier 0: "
                "without noise no round fits any budget"
            )
        if self.dp_accountant == "prv":
            self._check_prv()
        if self.dp_adaptive_quantile is not None:
            # The same rule the aggregate applies, checked here so that it is a bad value.
            adaptive_dp = AdaptiveClipping(
                self.dp_adaptive_quantile, self.dp_clip_lr, self.dp_count_noise
            )
            CentralDP(self.dp_clip, self.dp_noise_multiplier, adaptive_dp).update_noise_multiplier(
                float(self.clients_per_round)
            )

    def _check_prv(self) -> None:
        """Refuse, as a bad value, a PRV accounting that would take gigabytes of memory."""
        from ..privacy.privatize import check_accountant

        central = self.dp == "central"
        z = self.dp_noise_multiplier if central else self.dp_noise_multiplier / 2
        rate = self.clients_per_round / self.clients if central else 1.0
        # Without Opacus the run itself says how to install it.
        with contextlib.suppress(ImportError):
            check_accountant("prv", z, rate, self.rounds, self.dp_delta)

    @property
    def model_name(self) -> str:
        """The model ``model`` names, ``auto`` resolved: ``logreg`` on synthetic data (``mlp``
        for FedRep and FedPer, which need a body under the personal head), ``mlp`` on MNIST,
        ``cnn`` on CIFAR."""
        if self.model != "auto":
            return self.model
        if self.dataset == "synthetic":
            return "mlp" if self.algorithm in ("fedrep", "fedper") else "logreg"
        return "mlp" if self.dataset == "mnist" else "cnn"

    def _check_personal(self) -> None:
        owners = {
            "ditto_lambda": ("ditto",), "personal_epochs": ("ditto",), "head_epochs": ("fedrep",),
            "head": ("fedrep", "fedper"),
        }  # fmt: skip
        defaults = {f.name: f.default for f in attrs.fields(RunConfig) if f.name in owners}
        for name, algorithms in owners.items():
            if getattr(self, name) != defaults[name] and self.algorithm not in algorithms:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to {' and '.join(algorithms)}, not "
                    f"to {self.algorithm!r}"
                )
        if self.algorithm not in ("fedrep", "fedper"):
            return
        model = self.model_name
        if model == "logreg":
            raise ValueError(
                f"{self.algorithm} splits the model into a shared body and a personal head; "
                "logistic regression has one layer (use --model mlp or cnn)"
            )
        if self.head is not None:
            # The head must name entries of the model: checked on its architecture now.
            from ..algorithms.personal import split_head
            from ..models import build_template, cnn, mlp

            shape, classes = _SHAPES[self.dataset]
            builder = mlp if model == "mlp" else cnn
            split_head(build_template(lambda: builder(shape, classes)), self.head.split(","))

    def _check_client_state(self) -> None:
        given = [
            name
            for name in ("client_state_memory_mb", "client_state_dir")
            if getattr(self, name) is not None
        ]
        if given and self.algorithm not in STATEFUL:
            raise ValueError(
                f"{given[0]} applies to the algorithms whose clients keep state "
                f"({', '.join(STATEFUL)}); not to {self.algorithm!r}"
            )
