"""MNIST from local IDX files (the LeCun format, raw or gzip), with an IID federated split."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .._validators import check_int_at_least
from ..keys import Key
from .datasets import ClientData, FederatedDataset, TensorDataset
from .partition import iid

__all__ = ["load_mnist", "mnist_federated", "read_idx"]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype of the stored values.
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_MEAN = 0.1307
_MNIST_STD = 0.3081


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read an IDX file, gzip-compressed (detected by its magic bytes) or not.

    Returns:
        A writable native-endian array of the shape the header declares.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is malformed (bad magic, unknown type code, truncated header or
            data, trailing bytes, corrupt gzip stream).
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {name}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, zlib.error, EOFError) as e:
            raise ValueError(f"{name}: corrupt gzip stream ({e})") from e

    if len(raw) < 4:
        raise ValueError(f"{name}: truncated header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{name}: bad magic, expected first two bytes 0x0000, got 0x{raw[:2].hex()}"
        )
    code, ndim = raw[2], raw[3]
    dtype = _IDX_TYPES.get(code)
    if dtype is None:
        raise ValueError(f"{name}: unknown IDX type code 0x{code:02x}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{name}: truncated header ({len(raw)} bytes, need {header_size} for {ndim} dims)"
        )
    dims: tuple[int, ...] = struct.unpack(f">{ndim}I", raw[4:header_size])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    found = len(raw) - header_size
    if found < expected:
        raise ValueError(
            f"{name}: truncated data, expected {expected} bytes for shape {dims}, found {found}"
        )
    if found > expected:
        raise ValueError(
            f"{name}: {found - expected} trailing bytes after the {expected} bytes of data"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_size).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find(directory: Path, stem: str) -> Path:
    """The first existing spelling of an MNIST file (dashed or dotted, raw or ``.gz``)."""
    dotted = stem.replace("-idx", ".idx", 1)
    names = [stem, stem + ".gz", dotted, dotted + ".gz"]
    for candidate in names:
        path = directory / candidate
        if path.is_file():
            return path
    raise FileNotFoundError(f"MNIST file not found in {directory}; tried {', '.join(names)}")


def _load_split(directory: Path, prefix: str) -> TensorDataset:
    """One MNIST split (``prefix`` is ``"train"`` or ``"t10k"``) as a normalised dataset."""
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= 10:
        raise ValueError(f"{labels_path}: label {int(labels.max())} is not in [0, 10)")
    x = torch.as_tensor(images).to(torch.float32).div_(255.0)
    x = x.sub_(_MNIST_MEAN).div_(_MNIST_STD).unsqueeze(1)
    y = torch.as_tensor(labels).to(torch.int64)
    return TensorDataset(x, y)


def load_mnist(directory: str | os.PathLike[str]) -> tuple[TensorDataset, TensorDataset]:
    """Load MNIST ``(train, test)`` from the four IDX files in ``directory``.

    Each file may be named ``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``, raw or
    with ``.gz``. Inputs are float32 ``(N, 1, 28, 28)`` normalised as
    ``(pixel / 255 - 0.1307) / 0.3081``; labels are int64.

    Raises:
        FileNotFoundError: The directory or one of the files is missing.
        ValueError: A file is malformed or holds the wrong shapes, dtypes or labels.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {root}")
    return _load_split(root, "train"), _load_split(root, "t10k")


def mnist_federated(
    directory: str | os.PathLike[str], num_clients: int, key: Key
) -> FederatedDataset:
    """MNIST with its training set split IID over ``num_clients`` clients.

    The split is `blazefl_fn.data.partition.iid` with ``key.fold_in("partition")``: client
    sizes differ by at most one. Every client is an index view onto the one training dataset;
    the test set is MNIST's.

    Raises:
        FileNotFoundError: See `load_mnist`.
        ValueError: ``num_clients`` is below 1 or above the number of training examples, or a
            file is malformed.
    """
    check_int_at_least("num_clients", num_clients, 1)
    train, test = load_mnist(directory)
    parts = iid(len(train), num_clients, key.fold_in("partition"))
    clients = tuple(ClientData(train, parts.client(i)) for i in range(len(parts)))
    return FederatedDataset(name="mnist", clients=clients, test=test, num_classes=10)
