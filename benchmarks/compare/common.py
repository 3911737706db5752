"""What every runner shares: loading the data files, the client update, parameter digests.

torch and numpy only: the peer runners import this module inside the peers' venvs.

Data files (written once per data set by `benchmarks.compare.data`): ``x.npy`` (float32,
N x 3 x 32 x 32), ``y.npy`` (int64 labels), ``indices.npy`` and ``offsets.npy`` (client ``i``
holds ``indices[offsets[i]:offsets[i + 1]]``) and ``init.npz`` (the initial global
parameters by name).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "FederatedArrays",
    "client_seed",
    "digest",
    "load_arrays",
    "load_init",
    "train_client",
]


@dataclass(frozen=True)
class FederatedArrays:
    """All clients' examples in one base tensor pair plus each client's indices."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    offsets: list[int]

    @property
    def num_clients(self) -> int:
        """How many clients the partition has."""
        return len(self.offsets) - 1

    def client(self, i: int) -> torch.Tensor:
        """Client ``i``'s indices into ``x`` and ``y`` (a view)."""
        return self.indices[self.offsets[i] : self.offsets[i + 1]]


def load_arrays(directory: str | Path) -> FederatedArrays:
    """Read a data set written by `benchmarks.compare.data.write_dataset` into memory."""
    root = Path(directory)
    return FederatedArrays(
        x=torch.from_numpy(np.load(root / "x.npy")),
        y=torch.from_numpy(np.load(root / "y.npy")),
        indices=torch.from_numpy(np.load(root / "indices.npy")),
        offsets=[int(v) for v in np.load(root / "offsets.npy")],
    )


def load_init(directory: str | Path) -> dict[str, torch.Tensor]:
    """The initial global parameters, by name."""
    with np.load(Path(directory) / "init.npz") as arrays:
        return {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """The shuffling seed of one client in one round (bare loop and Flower client code)."""
    return (seed * 1_000_003 + round_index) * 1_000_003 + client_id


def train_client(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    data: FederatedArrays,
    client_id: int,
    generator: torch.Generator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """Plain FedAvg local training: load ``params``, mini-batch SGD, return new parameters.

    The update is ``p -= lr * grad`` (torch.optim.SGD without momentum), batches are gathered
    from the shared base tensors by index, the order is shuffled by ``generator`` each epoch.
    ``model`` is overwritten (it is the caller's scratch module).
    """
    model.load_state_dict(params)
    model.train()
    weights = list(model.parameters())
    indices = data.client(client_id)
    for _ in range(epochs):
        order = indices[torch.randperm(indices.shape[0], generator=generator)]
        for start in range(0, order.shape[0], batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.x[rows]), data.y[rows])
            loss.backward()  # pyright: ignore[reportUnknownMemberType]
            with torch.no_grad():
                for p in weights:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
                        p.grad = None
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def digest(params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes in sorted name order.

    The same function as ``blazefl_fn.tree.digest`` (a test checks it), so digests of the
    same parameters agree across frameworks.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        tensor = params[name]
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0"
        h.update(len(header).to_bytes(8, "little"))
        h.update(header.encode("utf-8"))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        raw = data.numpy().tobytes()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()
