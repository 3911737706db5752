"""Write one workload's data set once, so that every framework trains on identical bytes.

Inputs are CIFAR-10-shaped random tensors (3x32x32, float32, standard normal) and uniform
labels, all drawn from ``Key.from_seed(seed).fold_in("data")``; the split is blazefl_fn's
``shards`` partition (label-sorted shards, ``shards_per_client`` per client); the initial
global model comes from ``build_module(model, Key.from_seed(seed).fold_in("init"))``.
Timing does not depend on pixel values, so random inputs measure what CIFAR-10 would.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

import blazefl_fn as fl
from blazefl_fn.data.partition import shards

from . import models
from .spec import Workload

__all__ = ["write_dataset"]


def write_dataset(workload: Workload, directory: Path) -> str:
    """Write the workload's data files into ``directory``; returns a SHA-256 of their contents.

    Files that already exist with a matching digest are kept (the digest is stored beside them).
    """
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / "digest.txt"
    if stamp.exists():
        return stamp.read_text().strip()
    key = fl.Key.from_seed(workload.seed)
    generator = key.fold_in("data").torch_generator()
    n = workload.clients * workload.samples
    x = torch.randn(n, 3, 32, 32, generator=generator)
    y = torch.randint(0, workload.classes, (n,), generator=generator)
    partition = shards(y, workload.clients, workload.shards_per_client, key.fold_in("partition"))
    model_fn = functools.partial(models.build, workload.model, workload.classes)
    init = fl.tree.from_module(fl.build_module(model_fn, key.fold_in("init")))
    arrays = {
        "x.npy": x.numpy(),
        "y.npy": y.numpy(),
        "indices.npy": partition.indices.numpy(),
        "offsets.npy": np.asarray(partition.offsets, dtype=np.int64),
    }
    h = hashlib.sha256()
    for name, array in arrays.items():
        np.save(directory / name, array)
        h.update(name.encode())
        h.update(np.ascontiguousarray(array).tobytes())
    np.savez(directory / "init.npz", **{k: v.numpy() for k, v in init.items()})
    h.update(fl.tree.digest(init).encode())
    stamp.write_text(h.hexdigest())
    return h.hexdigest()
