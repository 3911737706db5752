"""Tests for the CIFAR loaders (python and binary formats) and the restricted unpickler, and
that a downloaded, extracted archive loads. All files are tiny fakes in tmp_path."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from _memory import traced_peak

from blazefl_fn.data.cifar import (
    CIFAR10_PYTHON_MD5,
    CIFAR100_PYTHON_MD5,
    load_cifar10,
    load_cifar100,
)
from blazefl_fn.data.download import download, extract_tar

PIXELS = 3072


def fake_pixels(n: int, offset: int = 0) -> npt.NDArray[np.uint8]:
    """Rows in CIFAR order with value ``(i + 3 c + 5 r + 7 col) % 256`` at channel c, row r, col."""
    i, c, r, col = np.meshgrid(
        np.arange(n) + offset, np.arange(3), np.arange(32), np.arange(32), indexing="ij"
    )
    return ((i + 3 * c + 5 * r + 7 * col) % 256).astype(np.uint8).reshape(n, PIXELS)


def expected_images(n: int, offset: int = 0) -> torch.Tensor:
    i, c, r, col = torch.meshgrid(
        torch.arange(n) + offset,
        torch.arange(3),
        torch.arange(32),
        torch.arange(32),
        indexing="ij",
    )
    return ((i + 3 * c + 5 * r + 7 * col) % 256).to(torch.float32) / 255.0


def dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar10_python(directory: Path, n: int = 4, n_test: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for b in range(1, 6):
        labels = [(b + k) % 10 for k in range(n)]
        dump(
            directory / f"data_batch_{b}",
            {b"batch_label": b"training batch", b"data": fake_pixels(n, 10 * b), b"labels": labels},
        )
    dump(directory / "test_batch", {b"data": fake_pixels(n_test), b"labels": list(range(n_test))})
    return directory


def cifar10_binary(directory: Path, n: int = 4, n_test: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for b in range(1, 6):
        labels = np.array([(b + k) % 10 for k in range(n)], dtype=np.uint8)
        records = np.concatenate([labels[:, None], fake_pixels(n, 10 * b)], axis=1)
        (directory / f"data_batch_{b}.bin").write_bytes(records.tobytes())
    labels = np.arange(n_test, dtype=np.uint8)
    records = np.concatenate([labels[:, None], fake_pixels(n_test)], axis=1)
    (directory / "test_batch.bin").write_bytes(records.tobytes())
    return directory


def cifar100_labels(n: int) -> tuple[list[int], list[int]]:
    fine = [(7 * k) % 100 for k in range(n)]
    return fine, [f // 5 for f in fine]


def cifar100_python(directory: Path, n: int = 5, n_test: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n), ("test", n_test)):
        fine, coarse = cifar100_labels(count)
        dump(
            directory / name,
            {b"data": fake_pixels(count), b"fine_labels": fine, b"coarse_labels": coarse},
        )
    return directory


def cifar100_binary(directory: Path, n: int = 5, n_test: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.bin", n), ("test.bin", n_test)):
        fine, coarse = cifar100_labels(count)
        labels = np.stack([np.array(coarse), np.array(fine)], axis=1).astype(np.uint8)
        records = np.concatenate([labels, fake_pixels(count)], axis=1)
        (directory / name).write_bytes(records.tobytes())
    return directory


# --------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize(
    ("make", "sub"),
    [
        (cifar10_python, ""),
        (cifar10_binary, ""),
        (cifar10_python, "cifar-10-batches-py"),
        (cifar10_binary, "cifar-10-batches-bin"),
    ],
)
def test_cifar10_round_trip(tmp_path: Path, make: Any, sub: str) -> None:
    make(tmp_path / sub if sub else tmp_path, n=4, n_test=3)
    train, test = load_cifar10(tmp_path)
    assert train.x.shape == (20, 3, 32, 32)
    assert train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64
    assert test.x.shape == (3, 3, 32, 32)
    # batches are concatenated in order 1..5; pixel order is R, G, B planes, row-major
    for b in range(1, 6):
        rows = slice(4 * (b - 1), 4 * b)
        assert torch.allclose(train.x[rows], expected_images(4, 10 * b))
        assert train.y[rows].tolist() == [(b + k) % 10 for k in range(4)]
    assert torch.allclose(test.x, expected_images(3))
    assert test.y.tolist() == [0, 1, 2]
    assert float(train.x.min()) >= 0.0
    assert float(train.x.max()) <= 1.0


@pytest.mark.parametrize(
    ("make", "sub"),
    [
        (cifar100_python, ""),
        (cifar100_binary, ""),
        (cifar100_python, "cifar-100-python"),
        (cifar100_binary, "cifar-100-binary"),
    ],
)
@pytest.mark.parametrize("label", ["fine", "coarse"])
def test_cifar100_round_trip(tmp_path: Path, make: Any, sub: str, label: str) -> None:
    make(tmp_path / sub if sub else tmp_path, n=5, n_test=3)
    train, test = load_cifar100(tmp_path, label=label)  # type: ignore[arg-type]
    fine, coarse = cifar100_labels(5)
    assert train.x.shape == (5, 3, 32, 32)
    assert torch.allclose(train.x, expected_images(5))
    assert torch.allclose(test.x, expected_images(3))
    assert train.y.dtype == torch.int64
    assert train.y.tolist() == (fine if label == "fine" else coarse)


def test_numpy1_python2_style_pickle(tmp_path: Path) -> None:
    """Real CIFAR batches name ``numpy.core.multiarray._reconstruct``; loading must resolve it
    without importing numpy.core (which warns on numpy 2, and warnings are errors here)."""
    d = cifar10_python(tmp_path, n=2, n_test=2)
    for path in d.iterdir():
        raw = path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray" in raw
        path.write_bytes(raw)
    train, _ = load_cifar10(d)
    assert torch.allclose(train.x[:2], expected_images(2, 10))


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar100(tmp_path)
    cifar10_python(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_bad_label_kind(tmp_path: Path) -> None:
    cifar100_python(tmp_path)
    with pytest.raises(ValueError, match="label must be"):
        load_cifar100(tmp_path, label="medium")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, "shape"),
        ({b"data": np.zeros((2, PIXELS), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, PIXELS), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((2, PIXELS), np.uint8), b"labels": [0, 10]}, "label 10"),
        ({b"data": np.zeros((2, PIXELS), np.uint8), b"labels": [-1, 0]}, "label -1"),
        ({b"data": np.zeros((2, PIXELS), np.uint8), b"labels": [0.5, 1.0]}, "ints"),
        ({b"data": np.zeros((0, PIXELS), np.uint8), b"labels": []}, "no images"),
        ({b"data": [[0] * PIXELS], b"labels": [0]}, "numpy array"),
        ({b"labels": [0]}, "missing key"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_malformed_python_batch(tmp_path: Path, batch: object, message: str) -> None:
    cifar10_python(tmp_path, n=2, n_test=2)
    dump(tmp_path / "test_batch", batch)
    with pytest.raises(ValueError, match=message) as info:
        load_cifar10(tmp_path)
    assert "test_batch" in str(info.value)


def test_corrupt_pickle(tmp_path: Path) -> None:
    cifar10_python(tmp_path, n=2, n_test=2)
    raw = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_2: corrupt pickle"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="corrupt pickle"):
        load_cifar10(tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cifar10_python(tmp_path / "d", n=2, n_test=2)
    dump(tmp_path / "d" / "test_batch", {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(ValueError, match=r"refusing to unpickle \w+\.system") as info:
        load_cifar10(tmp_path / "d")
    assert "test_batch" in str(info.value)
    assert "not part of a CIFAR batch" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (  # builtins.eval("1+1")
            b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",
            r"refusing to unpickle builtins\.eval",
        ),
        (  # _codecs.encode("a", "rot13"): only the latin1 use is allowed
            b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",
            "only allowed on str with latin1",
        ),
        (  # numpy.dtype("O"): object arrays could smuggle arbitrary objects
            b"\x80\x02cnumpy\ndtype\nX\x01\x00\x00\x00O\x85R.",
            "dtype object is not part of a CIFAR batch",
        ),
    ],
)
def test_other_globals_are_refused(tmp_path: Path, payload: bytes, message: str) -> None:
    cifar10_python(tmp_path, n=2, n_test=2)
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        load_cifar10(tmp_path)
    assert "test_batch" in str(info.value)


def test_truncated_binary(tmp_path: Path) -> None:
    cifar10_binary(tmp_path, n=2, n_test=2)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"test_batch\.bin: truncated"):
        load_cifar10(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_cifar10(tmp_path)


def test_binary_label_out_of_range(tmp_path: Path) -> None:
    cifar10_binary(tmp_path, n=2, n_test=2)
    path = tmp_path / "data_batch_4.bin"
    raw = bytearray(path.read_bytes())
    raw[PIXELS + 1] = 12  # label byte of the second record
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"data_batch_4\.bin: class label 12"):
        load_cifar10(tmp_path)


def test_cifar100_binary_checks_each_label_kind(tmp_path: Path) -> None:
    cifar100_binary(tmp_path, n=2, n_test=2)
    path = tmp_path / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[0] = 25  # coarse label of record 0: out of range; its fine label is untouched
    path.write_bytes(bytes(raw))
    load_cifar100(tmp_path, label="fine")
    with pytest.raises(ValueError, match=r"train\.bin: coarse label 25 is not in \[0, 20\)"):
        load_cifar100(tmp_path, label="coarse")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="3074-byte record"):
        load_cifar100(tmp_path)


# --------------------------------------------------------------------------------------------
# Download and extraction (their own tests are in test_data_download.py)


def test_md5_constants_look_right() -> None:
    assert len(CIFAR10_PYTHON_MD5) == 32
    assert len(CIFAR100_PYTHON_MD5) == 32


def test_download_extract_and_load_end_to_end(tmp_path: Path) -> None:
    src = cifar10_python(tmp_path / "build" / "cifar-10-batches-py", n=2, n_test=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    local = download(archive.as_uri(), tmp_path / "cache" / archive.name, sha)
    root = extract_tar(local, tmp_path / "data")
    train, test = load_cifar10(root)
    assert len(train) == 10
    assert len(test) == 2


# -- bounded allocation (issue 21, item 6: a 238-byte batch became 100,000 images) -------------


class _Zeros:
    """Pickles as ``bytes(n)``: n bytes that the file never held."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (bytes, (self.n,))


class _HugeArray:
    """Pickles as numpy does, but with its data from ``bytes(n)``."""

    def __reduce__(self) -> tuple[Any, ...]:
        reconstruct = np.zeros(1).__reduce__()[0]  # pyright: ignore[reportUnknownVariableType]
        state = (1, (100_000, PIXELS), np.dtype("u1"), False, _Zeros(100_000 * PIXELS))
        return (reconstruct, (np.ndarray, (0,), b"b"), state)


class _LabelsFromZeros:
    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (_Zeros(100_000),))


class _DirectArray:
    """``numpy.ndarray((n, 3072))`` called by the pickle: an allocation of any size."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.ndarray, ((100_000, PIXELS),))


def test_a_tiny_batch_declaring_100k_images_is_refused_before_allocating(tmp_path: Path) -> None:
    cifar10_python(tmp_path, n=2, n_test=2)
    dump(tmp_path / "test_batch", {b"data": _HugeArray(), b"labels": _LabelsFromZeros()})
    assert (tmp_path / "test_batch").stat().st_size < 400
    refused = pytest.raises(ValueError, match=r"bytes\(\) of a int is not part of a CIFAR batch")
    with traced_peak() as peak, refused:
        load_cifar10(tmp_path)
    assert peak.bytes < 4 << 20, peak


def test_calling_ndarray_directly_is_refused(tmp_path: Path) -> None:
    cifar10_python(tmp_path, n=2, n_test=2)
    dump(tmp_path / "test_batch", {b"data": _DirectArray(), b"labels": [0]})
    with pytest.raises(ValueError, match="corrupt pickle"):
        load_cifar10(tmp_path)


def test_shared_nested_labels_are_refused_before_numpy_expands_them(tmp_path: Path) -> None:
    import time

    cifar10_python(tmp_path, n=2, n_test=2)
    nested: object = [0]
    for _ in range(9):
        nested = [nested] * 10  # 10**9 ints behind a few hundred bytes
    dump(tmp_path / "test_batch", {b"data": fake_pixels(10), b"labels": nested})
    start = time.perf_counter()
    with pytest.raises(ValueError, match="must be a flat list of ints"):
        load_cifar10(tmp_path)
    assert time.perf_counter() - start < 5


def test_a_record_dtype_is_refused(tmp_path: Path) -> None:
    cifar10_python(tmp_path, n=2, n_test=2)
    data = np.zeros(2, dtype=[("a", "u1", (PIXELS,))])
    dump(tmp_path / "test_batch", {b"data": data, b"labels": [0, 1]})
    with pytest.raises(ValueError, match="is not part of a CIFAR batch"):
        load_cifar10(tmp_path)


class _ListOf:
    """Pickles as ``list(shared)``: one more call on an object the file holds once."""

    def __init__(self, shared: bytes) -> None:
        self.shared = shared

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (self.shared,))


def test_reusing_one_object_to_amplify_allocation_is_refused(tmp_path: Path) -> None:
    cifar10_python(tmp_path, n=2, n_test=2)
    shared = bytes(range(256)) * 400  # 100 KiB, stored once and referenced 2,000 times
    dump(tmp_path / "test_batch", {b"data": fake_pixels(2), b"labels": [0, 1],
                                   b"x": [_ListOf(shared) for _ in range(2000)]})  # fmt: skip
    assert (tmp_path / "test_batch").stat().st_size < 200_000
    refused = pytest.raises(ValueError, match="builds more data than a CIFAR batch of its size")
    with traced_peak() as peak, refused:
        load_cifar10(tmp_path)
    # Unbounded, it would be 2,000 lists of 102,400 items (1.6 GB).
    assert peak.bytes < 64 << 20, peak
