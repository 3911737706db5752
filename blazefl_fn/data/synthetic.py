"""The Synthetic(alpha, beta) federated benchmark of FedProx (Li et al. 2020).

The generator follows the FedProx reference code (after Shamir et al.), with ``alpha`` and
``beta`` read as variances as in the paper (``N(0, alpha)``), so their standard deviations are
``sqrt(alpha)`` and ``sqrt(beta)``.

A federation is built eagerly (every client's data generated up front, as index views onto one
base dataset) or lazily (`SyntheticClients`: client ``k``'s data generated from its key when it
is read), with the same data for the same key either way.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import SupportsIndex, overload

import attrs
import numpy as np
import numpy.typing as npt
import torch

from ..keys import Key
from .datasets import ClientData, FederatedDataset, TensorDataset

__all__ = ["SyntheticClients", "synthetic"]

_CPU = torch.device("cpu")
# The clients whose held-out rows form a lazy federation's test set, by default.
_LAZY_TEST_CLIENTS = 1000

Rows = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def _client_samples(
    rng: np.random.Generator,
    alpha: float,
    beta: float,
    dim: int,
    num_classes: int,
    max_samples: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """One client's ``(x, y)`` (x in float64; its rows are stored as float32), all draws taken
    from ``rng`` in a fixed order."""
    n = min(int(rng.lognormal(mean=4.0, sigma=2.0)) + 50, max_samples)
    u = float(rng.normal(0.0, math.sqrt(alpha)))
    b_mean = float(rng.normal(0.0, math.sqrt(beta)))
    v: npt.NDArray[np.float64] = rng.normal(b_mean, 1.0, size=dim)
    w: npt.NDArray[np.float64] = rng.normal(u, 1.0, size=(num_classes, dim))
    b: npt.NDArray[np.float64] = rng.normal(u, 1.0, size=num_classes)
    # Sigma is diagonal with Sigma_jj = j^-1.2, so x = v + sqrt(diag(Sigma)) * z.
    std = _std(dim)
    x: npt.NDArray[np.float64] = rng.standard_normal(size=(n, dim))
    # x = v + z * std, in place (the same roundings: a product, then a commutative sum).
    x *= std
    x += v
    # argmax(softmax(logits)) == argmax(logits): softmax is strictly increasing.
    logits: npt.NDArray[np.float64] = x @ w.T
    logits += b
    y: npt.NDArray[np.int64] = np.argmax(logits, axis=1).astype(np.int64, copy=False)
    return x, y


@functools.cache
def _std(dim: int) -> npt.NDArray[np.float64]:
    std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6
    std.flags.writeable = False  # shared by every client of this dim
    return std


def _test_count(test_fraction: float, n: int) -> int:
    # Rounded before flooring, so that float noise (0.2 * 55 = 11.000000000000002, 0.29 * 100 =
    # 28.999999999999996) does not move a sample across the split.
    return math.floor(round(test_fraction * n, 6))


def _check_arguments(
    alpha: float,
    beta: float,
    num_clients: int,
    dim: int,
    num_classes: int,
    test_fraction: float,
    max_samples: int,
) -> None:
    counts = {"num_clients": num_clients, "dim": dim, "num_classes": num_classes}
    _check_ints({**counts, "max_samples": max_samples})
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if max_samples < 50:
        raise ValueError(f"max_samples must be >= 50, got {max_samples}")


def _check_ints(values: dict[str, object]) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")


def _check_key(_instance: object, _attribute: object, key: object) -> None:
    if not isinstance(key, Key):
        raise TypeError(f"key must be a Key, got {type(key).__name__}")


def _check_device(_instance: object, _attribute: object, device: object) -> None:
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {device!r}")


@attrs.frozen
class SyntheticClients(Sequence[ClientData]):
    """The clients of a Synthetic(alpha, beta) federation, each generated when it is read.

    A `collections.abc.Sequence` of `ClientData` that holds only the generator's arguments:
    ``clients[k]`` draws client ``k``'s data from ``key.fold_in("synthetic").fold_in(k)``, the
    draws `synthetic` makes, and returns its training rows (a `ClientData` whose base holds
    just them, indexed ``0..n-1`` in order), so that its batches equal those of the eager
    federation for the same generator. Nothing is kept between reads: a client read twice is
    generated twice (bitwise the same), and the record costs the same few hundred bytes,
    pickled or not, whatever ``num_clients`` is. Executors receive it in place of the data.

    Indexing is as for a tuple (negative indexes count from the end; others raise
    `IndexError`); a slice returns a list of the clients it selects, each generated then.
    Iterating, ``in``, ``index`` and ``count`` generate every client they pass: prefer
    indexing the clients a round samples. `first` gives the prefix as another record.

    Build one with ``synthetic(..., lazy=True)``; constructing it directly checks the same
    arguments.

    Attributes:
        device: where read clients' tensors are created (`blazefl_fn.executors.devices.to_device`
            returns a copy for another device); the data is the same on every device.

    Raises:
        ValueError: an argument is out of range (as `synthetic`).
        TypeError: ``device`` is not a `torch.device`.

    Examples:
        >>> import pickle
        >>> from blazefl_fn.keys import Key
        >>> clients = SyntheticClients(1.0, 1.0, num_clients=1_000_000, key=Key.from_seed(0))
        >>> len(clients), len(pickle.dumps(clients)) < 1000
        (1000000, True)
        >>> client = clients[-1]  # generated now, from its own key
        >>> client.base.x.shape[1], client.indices[:3].tolist()
        (60, [0, 1, 2])
        >>> eager = synthetic(1.0, 1.0, num_clients=3, key=Key.from_seed(0)).clients[2]
        >>> lazy = clients[2]
        >>> torch.equal(eager.base.x[eager.indices], lazy.base.x)
        True
    """

    alpha: float
    beta: float
    num_clients: int
    key: Key = attrs.field(validator=_check_key)
    dim: int = 60
    num_classes: int = 10
    test_fraction: float = 0.2
    max_samples: int = 1000
    device: torch.device = attrs.field(default=_CPU, validator=_check_device)

    def __attrs_post_init__(self) -> None:
        _check_arguments(
            self.alpha,
            self.beta,
            self.num_clients,
            self.dim,
            self.num_classes,
            self.test_fraction,
            self.max_samples,
        )

    def __len__(self) -> int:
        return self.num_clients

    @overload
    def __getitem__(self, index: SupportsIndex) -> ClientData: ...

    @overload
    def __getitem__(self, index: slice) -> list[ClientData]: ...

    def __getitem__(self, index: SupportsIndex | slice) -> ClientData | list[ClientData]:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(self.num_clients))]
        k = operator.index(index)
        if k < 0:
            k += self.num_clients
        if not 0 <= k < self.num_clients:
            raise IndexError(
                f"client index {operator.index(index)} is out of range for "
                f"{self.num_clients} clients"
            )
        x, y, n_train = _generate(self, k)
        # The training rows only, in arrays of their own: the held-out rows are not kept.
        x32, y64 = _rows(x, y, slice(n_train))
        base = TensorDataset(
            torch.as_tensor(x32, device=self.device), torch.as_tensor(y64, device=self.device)
        )
        return ClientData(base, torch.arange(n_train, dtype=torch.int64, device=self.device))

    def first(self, n: int) -> SyntheticClients:
        """The first ``n`` clients, lazy too (client ``k``'s data does not depend on the count).

        Raises:
            ValueError: ``n`` is not in ``[1, num_clients]``.
        """
        _check_ints({"n": n})
        if not 1 <= n <= self.num_clients:
            raise ValueError(f"n must be in [1, num_clients={self.num_clients}], got {n}")
        return attrs.evolve(self, num_clients=n)

    def to_device(self, device: torch.device) -> SyntheticClients:
        """These clients, generated on ``device`` when read (``self`` if they are already)."""
        return self if device == self.device else attrs.evolve(self, device=device)


def _generate(
    clients: SyntheticClients, k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], int]:
    """Client ``k``'s rows (x in float64) and how many of them, from the first, are training
    rows; the rest are held out.

    The one place a client is generated, for the eager and the lazy federation alike.
    """
    rng = clients.key.fold_in("synthetic").fold_in(k).numpy_generator()
    x, y = _client_samples(
        rng, clients.alpha, clients.beta, clients.dim, clients.num_classes, clients.max_samples
    )
    return x, y, max(1, len(y) - _test_count(clients.test_fraction, len(y)))


def _rows(x: npt.NDArray[np.float64], y: npt.NDArray[np.int64], part: slice) -> Rows:
    """``part`` of a client's rows as stored, in arrays of their own (the float32 conversion
    and ``y``'s copy), so that keeping one part does not keep the others alive."""
    return x[part].astype(np.float32), y[part].copy()


def _concatenate(rows: list[Rows]) -> TensorDataset:
    return TensorDataset(
        torch.as_tensor(np.concatenate([x for x, _ in rows])),
        torch.as_tensor(np.concatenate([y for _, y in rows])),
    )


def synthetic(
    alpha: float,
    beta: float,
    num_clients: int,
    key: Key,
    *,
    dim: int = 60,
    num_classes: int = 10,
    test_fraction: float = 0.2,
    max_samples: int = 1000,
    lazy: bool = False,
    test_clients: int | None = None,
) -> FederatedDataset:
    """The FedProx Synthetic(alpha, beta) benchmark: one logistic-regression task per client.

    For client ``k``: ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``; ``W_k ~ N(u_k, 1)`` of shape
    ``(num_classes, dim)``, ``b_k ~ N(u_k, 1)``; ``v_k ~ N(B_k, 1)`` of shape ``(dim,)``;
    ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j^-1.2``;
    ``y = argmax(softmax(W_k x + b_k))``. ``alpha`` controls how much the local models differ,
    ``beta`` how much the local inputs differ.

    Client ``k`` has ``int(lognormal(4, 2)) + 50`` samples as in the FedProx generator, capped at
    ``max_samples``: the uncapped lognormal tail yields clients with tens of thousands of
    samples. Its last ``floor(test_fraction * n)`` samples are held out, the others (at least
    1) are its training data. The central test set is the held-out samples of the first
    ``test_clients`` clients, concatenated in client order.

    Client ``k``'s data is drawn from ``key.fold_in("synthetic").fold_in(k)`` only, so it does
    not depend on ``num_clients``, nor on ``lazy``:

    - eager (``lazy=False``): every client is generated now, and the clients are index views
      onto one base training dataset (memory grows with ``num_clients``, about 50 KiB each);
    - lazy (``lazy=True``): the clients are a `SyntheticClients`, which generates client ``k``
      when ``clients[k]`` is read. Only the test set is generated now, so a federation of a
      million clients is built in the time of its ``test_clients`` clients, and a round costs
      the generation of the clients it samples. The same key gives the same rows and batches
      as the eager federation.

    Args:
        alpha: Variance of the per-client model mean ``u_k`` (>= 0).
        beta: Variance of the per-client input mean ``B_k`` (>= 0).
        num_clients: Number of clients (>= 1).
        key: Source of all randomness.
        dim: Input dimension (>= 1).
        num_classes: Number of classes (>= 2).
        test_fraction: Fraction of each client's samples held out, in [0, 1).
        max_samples: Cap on each client's sample count (>= 50).
        lazy: Generate each client when it is read rather than now.
        test_clients: How many clients, from client 0, give their held-out samples to the
            test set, in ``[1, num_clients]``; None: every client when eager,
            ``min(num_clients, 1000)`` when lazy.

    Returns:
        A `FederatedDataset` named ``f"synthetic({alpha:g},{beta:g})"`` with float32 inputs of
        shape ``(dim,)`` and int64 labels.

    Raises:
        ValueError: An argument is out of range.

    Examples:
        >>> from blazefl_fn.keys import Key
        >>> fd = synthetic(0.5, 0.5, num_clients=3, key=Key.from_seed(0))
        >>> fd.name, len(fd.clients), fd.input_shape, fd.num_classes
        ('synthetic(0.5,0.5)', 3, (60,), 10)
        >>> all(client.base is fd.clients[0].base for client in fd.clients)
        True
        >>> huge = synthetic(0.5, 0.5, num_clients=1_000_000, key=Key.from_seed(0), lazy=True,
        ...                  test_clients=3)
        >>> len(huge.clients), torch.equal(huge.test.x, fd.test.x)
        (1000000, True)
    """
    clients = SyntheticClients(
        alpha,
        beta,
        num_clients,
        key,
        dim=dim,
        num_classes=num_classes,
        test_fraction=test_fraction,
        max_samples=max_samples,
    )
    if not isinstance(lazy, bool):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"lazy must be a bool, got {lazy!r}")
    if test_clients is None:
        test_clients = min(num_clients, _LAZY_TEST_CLIENTS) if lazy else num_clients
    _check_ints({"test_clients": test_clients})
    if not 1 <= test_clients <= num_clients:
        raise ValueError(
            f"test_clients must be in [1, num_clients={num_clients}], got {test_clients}"
        )
    name = f"synthetic({alpha:g},{beta:g})"
    if lazy:
        # Only the test clients are generated now, and only their held-out rows are kept.
        generated = (_generate(clients, k) for k in range(test_clients))
        test = _concatenate([_rows(x, y, slice(n, None)) for x, y, n in generated])
        return FederatedDataset(name=name, clients=clients, test=test, num_classes=num_classes)
    train: list[Rows] = []
    held_out: list[Rows] = []
    bounds: list[tuple[int, int]] = []
    start = 0
    for k in range(num_clients):
        x, y, n_train = _generate(clients, k)
        train.append(_rows(x, y, slice(n_train)))
        if k < test_clients:
            held_out.append(_rows(x, y, slice(n_train, None)))
        bounds.append((start, start + n_train))
        start += n_train
    base = _concatenate(train)
    views = tuple(ClientData(base, torch.arange(lo, hi, dtype=torch.int64)) for lo, hi in bounds)
    return FederatedDataset(
        name=name, clients=views, test=_concatenate(held_out), num_classes=num_classes
    )
