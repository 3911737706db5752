"""The Synthetic(alpha, beta) federated benchmark of FedProx (Li et al. 2020).

The generator follows the FedProx reference code (after Shamir et al.), with ``alpha`` and
``beta`` read as variances as in the paper (``N(0, alpha)``), so their standard deviations are
``sqrt(alpha)`` and ``sqrt(beta)``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from ..keys import Key
from .datasets import ClientData, FederatedDataset, TensorDataset

__all__ = ["synthetic"]


def _client_samples(
    rng: np.random.Generator,
    alpha: float,
    beta: float,
    dim: int,
    num_classes: int,
    max_samples: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """One client's ``(x, y)``, all draws taken from ``rng`` in a fixed order."""
    n = min(int(rng.lognormal(mean=4.0, sigma=2.0)) + 50, max_samples)
    u = float(rng.normal(0.0, math.sqrt(alpha)))
    b_mean = float(rng.normal(0.0, math.sqrt(beta)))
    v: npt.NDArray[np.float64] = rng.normal(b_mean, 1.0, size=dim)
    w: npt.NDArray[np.float64] = rng.normal(u, 1.0, size=(num_classes, dim))
    b: npt.NDArray[np.float64] = rng.normal(u, 1.0, size=num_classes)
    # Sigma is diagonal with Sigma_jj = j^-1.2, so x = v + sqrt(diag(Sigma)) * z.
    std: npt.NDArray[np.float64] = np.arange(1, dim + 1, dtype=np.float64) ** -0.6
    z: npt.NDArray[np.float64] = rng.standard_normal(size=(n, dim))
    x: npt.NDArray[np.float64] = v + z * std
    # argmax(softmax(logits)) == argmax(logits): softmax is strictly increasing.
    logits: npt.NDArray[np.float64] = x @ w.T + b
    y: npt.NDArray[np.int64] = np.argmax(logits, axis=1).astype(np.int64)
    return x.astype(np.float32), y


def _test_count(test_fraction: float, n: int) -> int:
    # Rounded before flooring, so that float noise (0.2 * 55 = 11.000000000000002, 0.29 * 100 =
    # 28.999999999999996) does not move a sample across the split.
    return math.floor(round(test_fraction * n, 6))


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
) -> FederatedDataset:
    """The FedProx Synthetic(alpha, beta) benchmark: one logistic-regression task per client.

    For client ``k``: ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``; ``W_k ~ N(u_k, 1)`` of shape
    ``(num_classes, dim)``, ``b_k ~ N(u_k, 1)``; ``v_k ~ N(B_k, 1)`` of shape ``(dim,)``;
    ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j^-1.2``;
    ``y = argmax(softmax(W_k x + b_k))``. ``alpha`` controls how much the local models differ,
    ``beta`` how much the local inputs differ.

    Client ``k`` has ``int(lognormal(4, 2)) + 50`` samples as in the FedProx generator, capped at
    ``max_samples``: the uncapped lognormal tail yields clients with tens of thousands of
    samples. Its last ``floor(test_fraction * n)`` samples go to the central test set
    (concatenated in client order), the others (at least 1) are its training data.

    Client ``k``'s data is drawn from ``key.fold_in("synthetic").fold_in(k)`` only, so it does
    not depend on ``num_clients``. All clients are index views onto one base training dataset.

    Args:
        alpha: Variance of the per-client model mean ``u_k`` (>= 0).
        beta: Variance of the per-client input mean ``B_k`` (>= 0).
        num_clients: Number of clients (>= 1).
        key: Source of all randomness.
        dim: Input dimension (>= 1).
        num_classes: Number of classes (>= 2).
        test_fraction: Fraction of each client's samples moved to the test set, in [0, 1).
        max_samples: Cap on each client's sample count (>= 50).

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
    """
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

    root = key.fold_in("synthetic")
    train_x: list[npt.NDArray[np.float32]] = []
    train_y: list[npt.NDArray[np.int64]] = []
    test_x: list[npt.NDArray[np.float32]] = []
    test_y: list[npt.NDArray[np.int64]] = []
    bounds: list[tuple[int, int]] = []
    start = 0
    for k in range(num_clients):
        rng = root.fold_in(k).numpy_generator()
        x, y = _client_samples(rng, alpha, beta, dim, num_classes, max_samples)
        n_train = max(1, len(y) - _test_count(test_fraction, len(y)))
        train_x.append(x[:n_train])
        train_y.append(y[:n_train])
        test_x.append(x[n_train:])
        test_y.append(y[n_train:])
        bounds.append((start, start + n_train))
        start += n_train

    base = TensorDataset(
        torch.as_tensor(np.concatenate(train_x)), torch.as_tensor(np.concatenate(train_y))
    )
    test = TensorDataset(
        torch.as_tensor(np.concatenate(test_x)), torch.as_tensor(np.concatenate(test_y))
    )
    clients = tuple(ClientData(base, torch.arange(lo, hi, dtype=torch.int64)) for lo, hi in bounds)
    return FederatedDataset(
        name=f"synthetic({alpha:g},{beta:g})",
        clients=clients,
        test=test,
        num_classes=num_classes,
    )
