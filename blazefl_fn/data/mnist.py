"""MNIST from local IDX files (the LeCun format, raw or gzip), with an IID federated split, and
an opt-in verified download of those files (`download_mnist`, ``blazefl-fn data mnist DIR``)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast

import attrs
import numpy as np
import numpy.typing as npt
import torch

from .._validators import check_int_at_least
from ..keys import Key
from .datasets import ClientData, FederatedDataset, TensorDataset
from .download import check_url, download, has_content
from .partition import iid

__all__ = ["MNIST_MIRRORS", "download_mnist", "load_mnist", "mnist_federated", "read_idx"]

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
"""Where `download_mnist` fetches MNIST's four ``.gz`` files from, tried in this order."""


@attrs.frozen
class _Pinned:
    """One MNIST file: its name, and the size and SHA-256 of its decompressed IDX content."""

    stem: str
    size: int
    sha256: str


# The original MNIST IDX files (the mirrors' .gz files differ: they were recompressed).
_MNIST_FILES = (
    _Pinned(
        "train-images-idx3-ubyte",
        47_040_016,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    _Pinned(
        "train-labels-idx1-ubyte",
        60_008,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    _Pinned(
        "t10k-images-idx3-ubyte",
        7_840_016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    _Pinned(
        "t10k-labels-idx1-ubyte",
        10_008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
)

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


_CHUNK = 1 << 20
# Above MNIST (70,000) and EMNIST ByClass (814,255): a header beyond it is refused unread, so
# an images file cannot make the loader inflate more than 784 MB.
_MAX_EXAMPLES = 1_000_000


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``stream``, read in chunks: nothing beyond what arrives (or
    beyond ``limit``) is ever allocated, whatever a header claims."""
    out = bytearray()
    while len(out) < limit:
        chunk = stream.read(min(_CHUNK, limit - len(out)))
        if not chunk:
            break
        out += chunk
    return out


_HeaderCheck = Callable[[tuple[int, ...], np.dtype[Any]], None]


def read_idx(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> npt.NDArray[Any]:
    """Read an IDX file, gzip-compressed (detected by its magic bytes) or not.

    Decompression is bounded: it stops one byte after the data the header declares, so a
    compressed file that inflates beyond its header (a "gzip bomb") is refused after at most
    that much output.

    Args:
        path: the file.
        max_bytes: refuse a header that declares more data than this, before reading any.

    Returns:
        A writable native-endian array of the shape the header declares.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is malformed (bad magic, unknown type code, truncated header or
            data, trailing bytes, corrupt gzip stream) or declares more than ``max_bytes``.

    Examples:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = pathlib.Path(d, "x.idx")
        ...     _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        ...     read_idx(p).tolist()
        [7, 8, 9]
    """
    return _read_idx(path, max_bytes, None)


def _read_idx(
    path: str | os.PathLike[str], max_bytes: int | None, check: _HeaderCheck | None
) -> npt.NDArray[Any]:
    """`read_idx`, with ``check(dims, dtype)`` called on the header before any data is read."""
    name = os.fspath(path)
    try:
        file = open(name, "rb")  # noqa: SIM115  # closed by the with below
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {name}") from None
    with file:
        compressed = file.read(2) == _GZIP_MAGIC
        file.seek(0)
        stream: BinaryIO = cast(BinaryIO, gzip.GzipFile(fileobj=file)) if compressed else file
        try:
            return _parse_idx(name, stream, max_bytes, check)
        except (OSError, zlib.error, EOFError) as e:
            raise ValueError(f"{name}: corrupt gzip stream ({e})") from e


def _parse_idx(
    name: str, stream: BinaryIO, max_bytes: int | None, check: _HeaderCheck | None
) -> npt.NDArray[Any]:
    head = _read_at_most(stream, 4)
    if len(head) < 4:
        raise ValueError(f"{name}: truncated header ({len(head)} bytes, need at least 4)")
    if head[0] != 0 or head[1] != 0:
        raise ValueError(
            f"{name}: bad magic, expected first two bytes 0x0000, got 0x{bytes(head[:2]).hex()}"
        )
    code, ndim = head[2], head[3]
    dtype = _IDX_TYPES.get(code)
    if dtype is None:
        raise ValueError(f"{name}: unknown IDX type code 0x{code:02x}")
    header_size = 4 + 4 * ndim
    shape_bytes = _read_at_most(stream, 4 * ndim)
    if len(shape_bytes) < 4 * ndim:
        raise ValueError(
            f"{name}: truncated header ({4 + len(shape_bytes)} bytes, need {header_size} for "
            f"{ndim} dims)"
        )
    dims: tuple[int, ...] = struct.unpack(f">{ndim}I", shape_bytes)
    if check is not None:
        check(dims, dtype)
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if max_bytes is not None and expected > max_bytes:
        raise ValueError(
            f"{name}: the header declares shape {dims} ({expected} bytes), more than the "
            f"{max_bytes} bytes expected"
        )
    raw = _read_at_most(stream, expected + 1)
    if len(raw) < expected:
        raise ValueError(
            f"{name}: truncated data, expected {expected} bytes for shape {dims}, found {len(raw)}"
        )
    if len(raw) > expected:
        rest = len(raw) - expected + len(_read_at_most(stream, _CHUNK))
        more = f"{rest}" if rest < _CHUNK + 1 else f"at least {rest}"
        raise ValueError(
            f"{name}: {more} trailing bytes after the {expected} bytes of data the header declares"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count).reshape(dims)
    # ``raw`` is a fresh bytearray, so the array may keep it: no copy unless bytes are swapped.
    return data.astype(dtype.newbyteorder("="), copy=False)


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(2) == _GZIP_MAGIC
    except OSError:
        return False


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

    # Labels first: their count bounds what the images file may declare, and both headers are
    # checked before any data is read (or inflated).
    def labels_header(dims: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        if dtype != np.uint8 or len(dims) != 1:
            raise ValueError(
                f"{labels_path}: expected uint8 labels of shape (N,), got {dtype} {dims}"
            )
        if dims[0] > _MAX_EXAMPLES:
            raise ValueError(
                f"{labels_path}: declares {dims[0]} labels, more than the {_MAX_EXAMPLES} "
                "an MNIST-format file may hold"
            )
        if dims[0] == 0:
            # An empty split: nothing to train on or to evaluate, said here, naming the file.
            raise ValueError(f"{labels_path}: holds no examples (0 labels)")

    labels = _read_idx(labels_path, None, labels_header)

    def images_header(dims: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        if dtype != np.uint8 or len(dims) != 3 or dims[1:] != (28, 28):
            raise ValueError(
                f"{images_path}: expected uint8 images of shape (N, 28, 28), got {dtype} {dims}"
            )
        if dims[0] != labels.shape[0]:
            raise ValueError(
                f"{images_path} has {dims[0]} images but {labels_path} has {labels.shape[0]} labels"
            )

    images = _read_idx(images_path, None, images_header)
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


def _already_there(root: Path, pinned: _Pinned) -> bool:
    """Whether the file `load_mnist` would read for ``pinned`` holds the original content."""
    try:
        path = _find(root, pinned.stem)
    except FileNotFoundError:
        return False
    return has_content(path, pinned.sha256, size=pinned.size, gunzip=_is_gzip(path))


def download_mnist(
    directory: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 60.0,
    progress: bool | TextIO = True,
) -> Path:
    """Download MNIST's four files into ``directory``, verified, so that `load_mnist` reads it.

    Each ``NAME.gz`` is fetched from the first of ``mirrors`` that serves it, decompressed, and
    its content checked against the size and SHA-256 of the original MNIST IDX file, pinned
    here (mirrors recompressed the files, so their ``.gz`` bytes differ; the content may not).
    ``directory`` then holds the four raw IDX files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
    (55 MB), each in place only once verified. A file that `load_mnist` would read already
    holding the original content (raw or ``.gz``, dashed or dotted name) is not downloaded
    again. Each download is `blazefl_fn.data.download.download`'s: atomic (an interrupted one
    leaves only a hidden ``.NAME.<tag>.part`` file) and resumable (the next call continues it).

    Args:
        directory: where the files go (created if missing).
        mirrors: base URLs that serve the four ``.gz`` files (``https://host/mnist/`` serving
            ``https://host/mnist/train-images-idx3-ubyte.gz``, ...), tried in order for each
            file; ``file:`` URLs work too.
        timeout: seconds to wait for a server at each step (connect, each read).
        progress: ``True`` draws a progress bar on stderr when it is a terminal; a stream
            draws it there; ``False`` draws nothing.

    Returns:
        ``directory`` as a `Path` (pass it to `load_mnist` or ``--data-dir``).

    Raises:
        DownloadError: No mirror could be reached for a file, or the connection broke (an
            `OSError`, one line naming each URL and its reason; the next call resumes).
        ChecksumError: A mirror served other content and none the original (a `ValueError`
            naming the URL and both digests; nothing is left in ``directory``).
        ValueError: No mirror, a mirror that is not an ``http``, ``https`` or ``file`` URL, or
            a bad ``timeout``.
        NotADirectoryError: ``directory`` is a file.

    Examples:
        >>> from blazefl_fn.data import download_mnist, load_mnist
        >>> train, test = load_mnist(download_mnist("data/mnist"))  # doctest: +SKIP
        >>> len(train), len(test)  # doctest: +SKIP
        (60000, 10000)
    """
    bases = (mirrors,) if isinstance(mirrors, str) else tuple(mirrors)
    if not bases:
        raise ValueError("download_mnist needs at least one mirror")
    if not 0 < timeout < math.inf:  # NaN fails too
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    bases = tuple(base if base.endswith("/") else base + "/" for base in bases)
    for base in bases:
        check_url(base)
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"MNIST directory {root} is not a directory")
    for pinned in _MNIST_FILES:
        if _already_there(root, pinned):
            continue
        download(
            [base + pinned.stem + ".gz" for base in bases],
            root / pinned.stem,
            pinned.sha256,
            gunzip=True,
            size=pinned.size,
            timeout=timeout,
            progress=progress,
        )
    return root


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
