"""CIFAR-10 / CIFAR-100 from local files (python-pickle or binary format), plus opt-in
verified downloads of the python-version archives.

Both official formats are accepted and detected automatically, in the given directory or in its
usual subfolder (``cifar-10-batches-py``, ``cifar-10-batches-bin``, ``cifar-100-python``,
``cifar-100-binary``). Each row of 3072 pixel bytes is the red plane (1024 bytes, row-major
32x32), then green, then blue; the loaders return float32 ``(N, 3, 32, 32)`` in ``[0, 1]``
(normalisation is a transform, see `blazefl_fn.data.transforms`) and int64 labels.

The python-format batches are pickles. They are read with a restricted unpickler that resolves
only what a CIFAR batch needs (numpy's array reconstruction, a latin-1 ``bytes`` helper and
builtin containers); any other global is refused with a ValueError before anything is called.

Nothing is ever downloaded implicitly: `download_cifar10` and `download_cifar100` are explicit,
built on `blazefl_fn.data.download`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import posixpath
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import attrs
import numpy as np
import numpy.typing as npt
import torch

from .datasets import TensorDataset
from .download import download, extract_tar

__all__ = [
    "CIFAR10_PYTHON_MD5",
    "CIFAR10_PYTHON_URL",
    "CIFAR100_PYTHON_MD5",
    "CIFAR100_PYTHON_URL",
    "download_cifar10",
    "download_cifar100",
    "load_cifar10",
    "load_cifar100",
]

CIFAR10_PYTHON_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
"""Where the CIFAR-10 python-version archive is published."""
CIFAR10_PYTHON_MD5 = "c58f30108f718f92721af3b95e74349a"
"""The MD5 of that archive as its publisher lists it (`download_cifar10` checks it)."""
CIFAR100_PYTHON_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
"""Where the CIFAR-100 python-version archive is published."""
CIFAR100_PYTHON_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
"""The MD5 of that archive as its publisher lists it (`download_cifar100` checks it)."""

_PIXELS = 3 * 32 * 32
_MAX_PICKLE = 512 << 20

# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


class _RefusedError(ValueError):
    """A pickle referenced a global outside the CIFAR allow-list."""


def _latin1_encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """The only use of ``_codecs.encode`` a CIFAR pickle needs: Python 3 writes ``bytes`` in
    protocol 2 as ``_codecs.encode(text, "latin1")``. Any other call is refused."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(
            f"_codecs.encode is only allowed on str with latin1, got {type(obj).__name__} "
            f"with {encoding!r}"
        )
    return obj.encode("latin1")


def _plain_dtype(*args: Any) -> np.dtype[Any]:
    """``numpy.dtype`` as called by array unpickling: plain numbers only (no object, record or
    sub-array dtypes, whose one item could be arbitrarily large)."""
    dtype: np.dtype[Any] = np.dtype(*args)
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"dtype {dtype} is not part of a CIFAR batch")
    return dtype


def _sized(kind: type[bytes] | type[bytearray]) -> Callable[..., bytes | bytearray]:
    """``bytes`` / ``bytearray`` as a pickle may call them: from existing data only. Called
    with a size (``bytes(10**9)``) they would allocate what the file never held."""

    def build(*args: object) -> bytes | bytearray:
        if args and not isinstance(args[0], str | bytes | bytearray | list | tuple):
            raise pickle.UnpicklingError(
                f"{kind.__name__}() of a {type(args[0]).__name__} is not part of a CIFAR batch"
            )
        return kind(*cast(tuple[Any, ...], args))

    return build


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: `_reconstruct` accepts it, but calling it
    (``ndarray(shape)``, an allocation of any size) is impossible."""


@attrs.define
class _Budget:
    """Bytes the allowed calls of one pickle may still produce. Each call is paid for before
    it runs, from the size of its input (or, for an array, its declared shape), so a file that
    reuses one object many times (a pickle reference costs two bytes) runs out of budget
    instead of memory."""

    name: str
    left: int

    def spend(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise _RefusedError(
                f"{self.name}: builds more data than a CIFAR batch of its size can hold "
                "(objects reused to amplify it)"
            )


class _CountedArray(np.ndarray[Any, Any]):
    """The array `_reconstruct` hands to ``__setstate__``: it pays for its declared size
    before numpy copies any data."""

    budget: _Budget

    def __setstate__(self, state: Any, /) -> None:
        parts = cast(tuple[object, ...], state) if isinstance(state, tuple) else ()
        shape, dtype = (parts[1], parts[2]) if len(parts) >= 3 else (None, None)
        dims = cast(tuple[object, ...], shape) if isinstance(shape, tuple) else None
        if (
            dims is None
            or not isinstance(dtype, np.dtype)
            or not all(isinstance(d, int) and d >= 0 for d in dims)
        ):
            raise pickle.UnpicklingError("an array state that is not numpy's")
        size = math.prod(cast(tuple[int, ...], dims))
        self.budget.spend(size * cast(np.dtype[Any], dtype).itemsize)
        super().__setstate__(cast(Any, parts))


def _reconstruct(budget: _Budget) -> Callable[..., Any]:
    """numpy's ``_reconstruct`` as its own pickles call it: an empty array, filled by
    ``__setstate__``, which checks the data's length against the declared shape."""

    def build(subtype: object, shape: object, dtype: object) -> Any:
        if subtype is not _NdarrayType or shape != (0,):
            raise pickle.UnpicklingError(
                f"_reconstruct({subtype!r}, {shape!r}) is not how numpy pickles an array"
            )
        array = _CountedArray((0,), np.uint8)
        array.budget = budget
        return array

    return build


def _paid(budget: _Budget, fn: Callable[..., Any], per_item: int) -> Callable[..., Any]:
    """``fn`` paying ``per_item`` bytes per item of its first argument before it runs."""

    def call(*args: Any) -> Any:
        if args and hasattr(args[0], "__len__"):
            budget.spend(per_item * len(args[0]) + 64)
        else:
            budget.spend(64)
        return fn(*args)

    return call


# The callables numpy's own pickles use, taken from numpy itself so that no private module is
# imported (``numpy.core`` warns on numpy 2) and both the numpy 1 and numpy 2 names resolve.
_reduced_array: Any = np.zeros(1, dtype=np.uint8).__reduce__()
_reduced_scalar: Any = np.float64(0.0).__reduce__()
_RECONSTRUCT: Callable[..., Any] = _reduced_array[0]
_SCALAR: Callable[..., Any] = _reduced_scalar[0]


def _allowed(budget: _Budget) -> dict[tuple[str, str], object]:
    """What one pickle may resolve, each call paid for from ``budget``."""
    reconstruct = _reconstruct(budget)
    allowed: dict[tuple[str, str], object] = {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.multiarray", "scalar"): _paid(budget, _SCALAR, 1),
        ("numpy._core.multiarray", "scalar"): _paid(budget, _SCALAR, 1),
        ("numpy", "ndarray"): _NdarrayType,
        ("numpy", "dtype"): _paid(budget, _plain_dtype, 1),
        ("_codecs", "encode"): _paid(budget, _latin1_encode, 1),
    }
    for module in ("builtins", "__builtin__"):
        for kind in (dict, frozenset, list, set, tuple):
            allowed[(module, kind.__name__)] = _paid(budget, kind, 64)
        allowed[(module, "bytes")] = _paid(budget, _sized(bytes), 1)
        allowed[(module, "bytearray")] = _paid(budget, _sized(bytearray), 1)
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals `_allowed` lists, within a byte budget of
    a few times the file's size."""

    def __init__(self, file: io.BufferedIOBase, name: str, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self._name = name
        self._allowed = _allowed(_Budget(name, 4 * size + (1 << 20)))

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _RefusedError(
                f"{self._name}: refusing to unpickle {module}.{name} (not part of a CIFAR batch)"
            ) from None


def _unpickle(path: Path) -> dict[bytes, Any]:
    """A CIFAR python batch: a dict with bytes (or str) keys, loaded with the allow-list."""
    name = str(path)
    size = path.stat().st_size
    if size > _MAX_PICKLE:
        raise ValueError(
            f"{name}: {size} bytes, more than the {_MAX_PICKLE} a CIFAR batch may have "
            "(CIFAR-100's train file, the largest, has 155 MB)"
        )
    raw = path.read_bytes()
    try:
        obj: object = _CifarUnpickler(io.BytesIO(raw), name, len(raw)).load()
    except _RefusedError:
        raise
    except Exception as e:
        raise ValueError(f"{name}: corrupt pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a pickled dict, got {type(obj).__name__}")
    batch: dict[bytes, Any] = {}
    for key, value in obj.items():  # pyright: ignore[reportUnknownVariableType]
        if isinstance(key, str):
            key = key.encode()
        if isinstance(key, bytes):
            batch[key] = value
    return batch


# --------------------------------------------------------------------------------------------
# Validation and conversion
# --------------------------------------------------------------------------------------------


def _pixels_from_pickle(name: str, data: object) -> npt.NDArray[np.uint8]:
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{name}: b'data' must be a numpy array, got {type(data).__name__}")
    array = np.asarray(cast("npt.NDArray[Any]", data))  # a plain ndarray, not _CountedArray
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != _PIXELS:
        raise ValueError(
            f"{name}: expected uint8 data of shape (N, {_PIXELS}), got {array.dtype} {array.shape}"
        )
    if array.shape[0] == 0:
        raise ValueError(f"{name}: holds no images")
    return array


def _labels_from_pickle(name: str, key: bytes, labels: object, n: int) -> npt.NDArray[np.int64]:
    if isinstance(labels, np.ndarray):
        array = np.asarray(cast("npt.NDArray[Any]", labels))
    elif isinstance(labels, list | tuple):
        items = cast("Sequence[object]", labels)
        if len(items) != n:
            raise ValueError(f"{name}: {n} images but {len(items)} labels in {key!r}")
        # Checked before numpy sees them: nested (possibly shared) lists would otherwise be
        # expanded into an array of any size.
        if not all(type(v) is int for v in items):
            raise ValueError(f"{name}: {key!r} must be a flat list of ints")
        array = np.asarray(items)
    else:
        raise ValueError(f"{name}: {key!r} must be a list of ints, got {type(labels).__name__}")
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{name}: {key!r} must be a 1-D sequence of ints, got {array.dtype} {array.shape}"
        )
    if array.shape[0] != n:
        raise ValueError(f"{name}: {n} images but {array.shape[0]} labels in {key!r}")
    return array.astype(np.int64)


def _check_range(name: str, labels: npt.NDArray[np.int64], num_classes: int, what: str) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"{name}: {what} label {bad} is not in [0, {num_classes})")


def _read_binary(
    path: Path, label_bytes: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Records of ``label_bytes`` label bytes + 3072 pixel bytes -> (labels (N, k), pixels)."""
    name = str(path)
    raw = path.read_bytes()
    record = label_bytes + _PIXELS
    if not raw:
        raise ValueError(f"{name}: file is empty")
    if len(raw) % record:
        raise ValueError(
            f"{name}: truncated, size {len(raw)} is not a multiple of the {record}-byte record"
        )
    table = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return table[:, :label_bytes], table[:, label_bytes:]


def _to_dataset(pixels: npt.NDArray[np.uint8], labels: npt.NDArray[Any]) -> TensorDataset:
    images = np.ascontiguousarray(pixels).reshape(-1, 3, 32, 32)
    x = torch.as_tensor(images.copy()).to(torch.float32).div_(255.0)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64).copy())
    return TensorDataset(x, y)


def _load_python(paths: Sequence[Path], label_key: bytes, num_classes: int) -> TensorDataset:
    pixels: list[npt.NDArray[np.uint8]] = []
    labels: list[npt.NDArray[np.int64]] = []
    for path in paths:
        name = str(path)
        batch = _unpickle(path)
        for key in (b"data", label_key):
            if key not in batch:
                raise ValueError(f"{name}: missing key {key!r}")
        data = _pixels_from_pickle(name, batch[b"data"])
        y = _labels_from_pickle(name, label_key, batch[label_key], data.shape[0])
        _check_range(name, y, num_classes, label_key.decode())
        pixels.append(data)
        labels.append(y)
    return _to_dataset(np.concatenate(pixels), np.concatenate(labels))


def _load_binary(
    paths: Sequence[Path], label_column: int, label_bytes: int, num_classes: int, what: str
) -> TensorDataset:
    pixels: list[npt.NDArray[np.uint8]] = []
    labels: list[npt.NDArray[np.int64]] = []
    for path in paths:
        label_table, data = _read_binary(path, label_bytes)
        y = label_table[:, label_column].astype(np.int64)
        _check_range(str(path), y, num_classes, what)
        pixels.append(data)
        labels.append(y)
    return _to_dataset(np.concatenate(pixels), np.concatenate(labels))


# --------------------------------------------------------------------------------------------
# Locating the files
# --------------------------------------------------------------------------------------------

_Format = Literal["python", "binary"]


def _locate(
    directory: str | os.PathLike[str],
    dataset: str,
    subfolders: dict[_Format, str],
    files: dict[_Format, tuple[list[str], list[str]]],
) -> tuple[_Format, list[Path], list[Path]]:
    """The format and the (train, test) files of a CIFAR directory or its usual subfolder.

    A format is chosen where its test file exists; every one of its files must then exist.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} directory not found: {root}")
    tried: list[str] = []
    for fmt, sub in subfolders.items():
        for folder in (root, root / sub):
            train_names, test_names = files[fmt]
            if not (folder / test_names[0]).is_file():
                tried.append(f"{folder / test_names[0]} ({fmt} format)")
                continue
            train = [folder / n for n in train_names]
            test = [folder / n for n in test_names]
            missing = [str(p) for p in train + test if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{dataset} ({fmt} format) in {folder}: missing {', '.join(missing)}"
                )
            return fmt, train, test
    raise FileNotFoundError(f"{dataset} files not found; tried {'; '.join(tried)}")


def load_cifar10(directory: str | os.PathLike[str]) -> tuple[TensorDataset, TensorDataset]:
    """Load CIFAR-10 ``(train, test)`` from ``directory`` (or its ``cifar-10-batches-py`` /
    ``cifar-10-batches-bin`` subfolder), python or binary format.

    Python format: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``; binary format: the
    same names with ``.bin``. Inputs are float32 ``(N, 3, 32, 32)`` in ``[0, 1]``; labels int64
    in ``[0, 10)``. Any number of records per file is accepted (so tiny test files work).

    Raises:
        FileNotFoundError: The directory or one of the files is missing.
        ValueError: A file is malformed (refused or corrupt pickle, wrong shapes or dtype,
            label out of range, truncated binary file).
    """
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    fmt, train, test = _locate(
        directory,
        "CIFAR-10",
        {"python": "cifar-10-batches-py", "binary": "cifar-10-batches-bin"},
        {
            "python": (train_names, ["test_batch"]),
            "binary": ([n + ".bin" for n in train_names], ["test_batch.bin"]),
        },
    )
    if fmt == "python":
        return _load_python(train, b"labels", 10), _load_python(test, b"labels", 10)
    return _load_binary(train, 0, 1, 10, "class"), _load_binary(test, 0, 1, 10, "class")


def load_cifar100(
    directory: str | os.PathLike[str], *, label: Literal["fine", "coarse"] = "fine"
) -> tuple[TensorDataset, TensorDataset]:
    """Load CIFAR-100 ``(train, test)`` from ``directory`` (or its ``cifar-100-python`` /
    ``cifar-100-binary`` subfolder), python (``train``, ``test``) or binary (``train.bin``,
    ``test.bin``) format.

    ``label`` picks the 100 fine classes or the 20 coarse superclasses. Inputs are float32
    ``(N, 3, 32, 32)`` in ``[0, 1]``; labels int64.

    Raises:
        FileNotFoundError: The directory or one of the files is missing.
        ValueError: ``label`` is not ``"fine"`` or ``"coarse"``, or a file is malformed.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    num_classes = 100 if label == "fine" else 20
    fmt, train, test = _locate(
        directory,
        "CIFAR-100",
        {"python": "cifar-100-python", "binary": "cifar-100-binary"},
        {"python": (["train"], ["test"]), "binary": (["train.bin"], ["test.bin"])},
    )
    if fmt == "python":
        key = f"{label}_labels".encode()
        return _load_python(train, key, num_classes), _load_python(test, key, num_classes)
    column = 1 if label == "fine" else 0  # record: coarse byte, fine byte, pixels
    return (
        _load_binary(train, column, 2, num_classes, label),
        _load_binary(test, column, 2, num_classes, label),
    )


# --------------------------------------------------------------------------------------------
# Download (opt-in, never called by the loaders)
# --------------------------------------------------------------------------------------------


def _download_cifar(
    directory: str | os.PathLike[str],
    url: str,
    md5: str,
    folder: str,
    mirrors: Sequence[str] | None,
    timeout: float,
    progress: bool | TextIO,
) -> Path:
    """Download the archive at ``url`` (or of the same name at each of ``mirrors``) into
    ``directory`` and extract its ``folder`` beside it, atomically."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    if mirrors is not None:
        bases = (mirrors,) if isinstance(mirrors, str) else tuple(mirrors)
        urls = [base if base.endswith("/") else base + "/" for base in bases]
        sources: list[str] = [base + name for base in urls]
    else:
        sources = [url]
    if (root / folder).is_dir():
        return root
    archive = download(sources, root / name, md5=md5, timeout=timeout, progress=progress)
    # Extracted beside the target and renamed into place: a folder that exists is complete.
    temp = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".tmp", dir=root))
    try:
        extract_tar(archive, temp)
        if not (temp / folder).is_dir():
            raise ValueError(f"{archive}: holds no {folder}/ folder")
        try:
            (temp / folder).rename(root / folder)
        except OSError:
            if not (root / folder).is_dir():  # else another process extracted it meanwhile
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return root


def download_cifar10(
    directory: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
    progress: bool | TextIO = True,
) -> Path:
    """Download CIFAR-10 (python version) into ``directory``, verified, for `load_cifar10`.

    ``directory`` then holds ``cifar-10-python.tar.gz`` (170 MB, checked against
    `CIFAR10_PYTHON_MD5`) and ``cifar-10-batches-py/`` extracted from it (with `extract_tar`,
    into a hidden folder renamed into place, so the folder is complete once it exists). The
    archive is downloaded with `blazefl_fn.data.download.download`: atomic, resumable, and not
    again when it is already there and verified. When ``cifar-10-batches-py/`` exists, nothing
    is done (remove it to download and extract again).

    Args:
        directory: where the archive and the folder go (created if missing).
        mirrors: base URLs to fetch ``cifar-10-python.tar.gz`` from instead of
            `CIFAR10_PYTHON_URL`, tried in order.
        timeout: seconds to wait for the server at each step.
        progress: ``True`` draws a progress bar on stderr when it is a terminal; a stream
            draws it there; ``False`` draws nothing.

    Returns:
        ``directory`` as a `Path` (pass it to `load_cifar10`).

    Raises:
        DownloadError: No source could be reached or the connection broke (an `OSError`
            naming the URL and the reason; the next call resumes).
        ChecksumError: The archive is not the published one (a `ValueError`).
        ValueError: A bad mirror URL or timeout, or an archive without the folder.
        NotADirectoryError: ``directory`` is a file.

    Examples:
        >>> from blazefl_fn.data import download_cifar10, load_cifar10
        >>> train, test = load_cifar10(download_cifar10("data/cifar10"))  # doctest: +SKIP
    """
    return _download_cifar(
        directory,
        CIFAR10_PYTHON_URL,
        CIFAR10_PYTHON_MD5,
        "cifar-10-batches-py",
        mirrors,
        timeout,
        progress,
    )


def download_cifar100(
    directory: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
    progress: bool | TextIO = True,
) -> Path:
    """Download CIFAR-100 (python version) into ``directory``, verified, for `load_cifar100`.

    ``directory`` then holds ``cifar-100-python.tar.gz`` (169 MB, checked against
    `CIFAR100_PYTHON_MD5`) and ``cifar-100-python/`` extracted from it, as
    `download_cifar10` does for CIFAR-10.

    Args:
        directory: where the archive and the folder go (created if missing).
        mirrors: base URLs to fetch ``cifar-100-python.tar.gz`` from instead of
            `CIFAR100_PYTHON_URL`, tried in order.
        timeout: seconds to wait for the server at each step.
        progress: ``True`` draws a progress bar on stderr when it is a terminal; a stream
            draws it there; ``False`` draws nothing.

    Returns:
        ``directory`` as a `Path` (pass it to `load_cifar100`).

    Raises:
        DownloadError: No source could be reached or the connection broke (an `OSError`
            naming the URL and the reason; the next call resumes).
        ChecksumError: The archive is not the published one (a `ValueError`).
        ValueError: A bad mirror URL or timeout, or an archive without the folder.
        NotADirectoryError: ``directory`` is a file.

    Examples:
        >>> from blazefl_fn.data import download_cifar100, load_cifar100
        >>> train, test = load_cifar100(download_cifar100("data/cifar100"))  # doctest: +SKIP
    """
    return _download_cifar(
        directory,
        CIFAR100_PYTHON_URL,
        CIFAR100_PYTHON_MD5,
        "cifar-100-python",
        mirrors,
        timeout,
        progress,
    )
