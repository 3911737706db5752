"""Tests for the IDX reader, the MNIST loader and its IID federated split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from _memory import traced_peak
from _paths import MNIST_ENV, mnist_dir, mnist_search_path
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.data import TensorDataset, load_mnist, mnist_federated, read_idx
from blazefl_fn.keys import Key

_CODES: dict[str, int] = {
    ">u1": 0x08,
    ">i1": 0x09,
    ">i2": 0x0B,
    ">i4": 0x0C,
    ">f4": 0x0D,
    ">f8": 0x0E,
}


def idx_bytes(array: npt.NDArray[Any], code: int | None = None) -> bytes:
    """The IDX encoding of ``array`` (type code from its dtype unless given)."""
    big = array.astype(array.dtype.newbyteorder(">"))
    if code is None:
        code = _CODES[big.dtype.str.replace("|", ">")]
    header = struct.pack(f">2xBB{array.ndim}I", code, array.ndim, *array.shape)
    return header + big.tobytes()


def write(path: Path, payload: bytes, *, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


def fake_pixels(n: int) -> npt.NDArray[np.uint8]:
    """Images with pixel ``[i, r, c] = (i + 9 r + c) % 256`` (covers 0 and 255)."""
    i, r, c = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    return ((i + 9 * r + c) % 256).astype(np.uint8)


def fake_mnist(
    directory: Path, n_train: int = 20, n_test: int = 10, *, compress: bool = False
) -> Path:
    """A tiny MNIST directory in the real format; see `fake_pixels` and labels ``i % 10``."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = fake_pixels(n)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write(
            directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), compress=compress
        )
        write(
            directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), compress=compress
        )
    return directory


# -- read_idx --------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-(2**31), -1, 0, 1, 2**31 - 1], dtype=np.int32),
        np.array([[1.5, -2.25], [np.inf, 3.0e-7]], dtype=np.float32),
        np.array([-3, 0, 7], dtype=np.int16),
        np.array([[-1.0e300, 2.0]], dtype=np.float64),
        np.array([-128, 127], dtype=np.int8),
    ],
    ids=["uint8", "int32", "float32", "int16", "float64", "int8"],
)
def test_read_idx_roundtrip(tmp_path: Path, array: npt.NDArray[Any], compress: bool) -> None:
    path = write(tmp_path / "data.idx", idx_bytes(array), compress=compress)
    out = read_idx(path)
    assert out.dtype == array.dtype
    assert out.dtype.isnative
    assert out.shape == array.shape
    assert np.array_equal(out, array)
    assert out.flags.writeable
    out[...] = 0  # a copy, not a view on the file's bytes


def test_read_idx_big_endian_layout(tmp_path: Path) -> None:
    payload = struct.pack(">2xBBI", 0x0C, 1, 2) + bytes([0, 0, 1, 2, 0xFF, 0xFF, 0xFF, 0xFE])
    out = read_idx(write(tmp_path / "x", payload))
    assert out.tolist() == [258, -2]


def test_read_idx_accepts_str_path_and_any_name(tmp_path: Path) -> None:
    array = np.arange(5, dtype=np.uint8)
    path = write(tmp_path / "no-gz-suffix", idx_bytes(array), compress=True)
    assert np.array_equal(read_idx(str(path)), array)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(list(_CODES)),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
    compress=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_read_idx_roundtrip_property(
    tmp_path_factory: pytest.TempPathFactory,
    dtype: str,
    shape: tuple[int, ...],
    compress: bool,
    seed: int,
) -> None:
    rng = Key.from_seed(seed).numpy_generator()
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    array = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
    path = write(tmp_path_factory.mktemp("idx") / "a", idx_bytes(array), compress=compress)
    out = read_idx(path)
    assert out.shape == shape
    assert out.tobytes() == array.astype(out.dtype).tobytes()


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", r"bad magic.*0x0100"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", r"unknown IDX type code 0x07"),
        (b"\x00\x00", r"truncated header"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), r"truncated header"),
        (struct.pack(">2xBBII", 0x08, 2, 3, 4) + bytes(11), r"expected 12 bytes.*found 11"),
        (struct.pack(">2xBBI", 0x0C, 1, 2) + bytes(7), r"expected 8 bytes.*found 7"),
        (struct.pack(">2xBBI", 0x08, 1, 3) + bytes(5), r"2 trailing bytes"),
    ],
    ids=["magic", "type", "short-header", "short-dims", "short-data", "short-int32", "trailing"],
)
def test_read_idx_malformed(tmp_path: Path, payload: bytes, match: str, compress: bool) -> None:
    path = write(tmp_path / "bad.idx", payload, compress=compress)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: len(b) // 2],  # truncated stream
        lambda b: b[:10] + bytes(len(b) - 10),  # zeroed deflate data
        lambda b: b[:-8] + bytes(8),  # bad CRC / length trailer
        lambda b: b[:2] + b"\x00" + b[3:],  # bad compression method
    ],
    ids=["truncated", "zeroed", "crc", "method"],
)
def test_read_idx_corrupt_gzip(tmp_path: Path, mangle: Any) -> None:
    good = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)), mtime=0)
    path = write(tmp_path / "corrupt.gz", mangle(good))
    with pytest.raises(ValueError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.idx"
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        read_idx(path)


# -- load_mnist ------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_fake(tmp_path: Path, compress: bool) -> None:
    train, test = load_mnist(fake_mnist(tmp_path / "mnist", compress=compress))
    assert len(train) == 20
    assert len(test) == 10
    for ds in (train, test):
        assert ds.x.shape == (len(ds), 1, 28, 28)
        assert ds.x.dtype == torch.float32
        assert ds.y.dtype == torch.int64
    assert train.y.tolist() == [i % 10 for i in range(20)]
    expected = (torch.tensor(fake_pixels(20), dtype=torch.float32) / 255 - 0.1307) / 0.3081
    assert torch.allclose(train.x[:, 0], expected)
    assert float(train.x[0, 0, 0, 0]) == pytest.approx((0 / 255 - 0.1307) / 0.3081, abs=1e-6)
    assert float(train.x[0, 0, 27, 12]) == pytest.approx((255 / 255 - 0.1307) / 0.3081, abs=1e-6)
    assert float(train.x[1, 0, 1, 1]) == pytest.approx((11 / 255 - 0.1307) / 0.3081, abs=1e-6)
    assert float(test.x[9, 0, 0, 0]) == pytest.approx((9 / 255 - 0.1307) / 0.3081, abs=1e-6)


def test_load_mnist_dotted_names(tmp_path: Path) -> None:
    directory = fake_mnist(tmp_path / "mnist")
    for path in list(directory.iterdir()):
        path.rename(directory / path.name.replace("-idx", ".idx"))
    train, test = load_mnist(directory)
    assert (len(train), len(test)) == (20, 10)


def test_load_mnist_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST directory not found"):
        load_mnist(tmp_path / "absent")


def test_load_mnist_missing_file(tmp_path: Path) -> None:
    directory = fake_mnist(tmp_path / "mnist")
    (directory / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"t10k-labels-idx1-ubyte, t10k-labels-idx1-ubyte\.gz"
    ):
        load_mnist(directory)


@pytest.mark.parametrize(
    ("name", "array", "match"),
    [
        ("train-images-idx3-ubyte", np.zeros((20, 28, 27), np.uint8), r"\(N, 28, 28\)"),
        ("train-images-idx3-ubyte", np.zeros((20, 28, 28), np.int32), r"uint8 images"),
        ("train-labels-idx1-ubyte", np.zeros((20, 1), np.uint8), r"uint8 labels"),
        ("train-labels-idx1-ubyte", np.zeros(19, np.uint8), r"20 images.*19 labels"),
        ("train-labels-idx1-ubyte", np.full(20, 10, np.uint8), r"label 10"),
    ],
)
def test_load_mnist_bad_contents(
    tmp_path: Path, name: str, array: npt.NDArray[Any], match: str
) -> None:
    directory = fake_mnist(tmp_path / "mnist")
    write(directory / name, idx_bytes(array))
    with pytest.raises(ValueError, match=match):
        load_mnist(directory)


# -- mnist_federated -------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients", [1, 3, 7, 20])
def test_mnist_federated_split(tmp_path: Path, num_clients: int) -> None:
    fd = mnist_federated(fake_mnist(tmp_path / "mnist"), num_clients, Key.from_seed(0))
    assert fd.name == "mnist"
    assert fd.num_classes == 10
    assert fd.input_shape == (1, 28, 28)
    assert len(fd.test) == 10
    sizes = [len(c) for c in fd.clients]
    q, r = divmod(20, num_clients)
    assert sizes == [q + 1] * r + [q] * (num_clients - r)
    base = fd.clients[0].base
    assert all(c.base is base for c in fd.clients)
    assert all(c.indices.dtype == torch.int64 for c in fd.clients)
    combined = torch.cat([c.indices for c in fd.clients])
    assert torch.equal(combined.sort().values, torch.arange(20))


def test_mnist_federated_depends_on_key_only(tmp_path: Path) -> None:
    directory = fake_mnist(tmp_path / "mnist")

    def split(seed: int) -> list[list[int]]:
        fd = mnist_federated(directory, 4, Key.from_seed(seed))
        return [c.indices.tolist() for c in fd.clients]

    assert split(1) == split(1)
    assert split(1) != split(2)
    # Client k holds the k-th block of 5 of the key's permutation, in ascending order.
    perm = Key.from_seed(1).fold_in("partition").permutation(20)
    assert split(1) == [sorted(perm[k * 5 : (k + 1) * 5]) for k in range(4)]


@pytest.mark.parametrize("num_clients", [0, -1, 21])
def test_mnist_federated_bad_num_clients(tmp_path: Path, num_clients: int) -> None:
    with pytest.raises(ValueError, match=f"num_clients.*{num_clients}"):
        mnist_federated(fake_mnist(tmp_path / "mnist"), num_clients, Key.from_seed(0))


# -- the real data ---------------------------------------------------------------------------


def _class_counts(ds: TensorDataset) -> list[int]:
    return torch.bincount(ds.y, minlength=10).tolist()


def test_real_mnist() -> None:
    directory = mnist_dir()
    if directory is None:
        pytest.skip(f"MNIST not found at {mnist_search_path()}; set {MNIST_ENV}")
    train, test = load_mnist(directory)
    assert (len(train), len(test)) == (60000, 10000)
    assert _class_counts(train) == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert _class_counts(test) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(train.x.mean())) < 1e-3
    assert abs(float(train.x.std()) - 1.0) < 1e-3


# -- bounded decompression (issue 21, item 6: a 2 MB .gz was inflated to 2.3 GB) ---------------


def _bomb(path: Path, dims: tuple[int, ...], inflated: int) -> Path:
    """A gzip IDX file whose header declares ``dims`` uint8 but that inflates to ``inflated``
    bytes of data."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(struct.pack(f">2xBB{len(dims)}I", 0x08, len(dims), *dims))
        block = bytes(1 << 20)
        for _ in range(inflated >> 20):
            f.write(block)
    return path


def test_decompression_stops_just_past_what_the_header_declares(tmp_path: Path) -> None:
    path = _bomb(tmp_path / "bomb.gz", (10, 28, 28), 256 << 20)  # 256 MiB behind 7,840 bytes
    assert path.stat().st_size < 400_000
    refused = pytest.raises(ValueError, match="trailing bytes after the 7840 bytes of data")
    with traced_peak() as peak, refused:
        read_idx(path)
    assert peak.bytes < 8 << 20, peak  # a few chunks, not 256 MiB


def test_a_header_declaring_more_than_allowed_reads_no_data(tmp_path: Path) -> None:
    path = write(tmp_path / "x", struct.pack(">2xBBIII", 0x08, 3, 2**32 - 1, 28, 28) + bytes(8))
    with pytest.raises(ValueError, match=r"declares shape \(4294967295, 28, 28\)"):
        read_idx(path, max_bytes=1000)
    # Without a bound it is an ordinary truncation: nothing of the declared size is allocated.
    with pytest.raises(ValueError, match="truncated data"):
        read_idx(path)


def test_mnist_images_may_not_declare_more_than_their_labels(tmp_path: Path) -> None:
    fake_mnist(tmp_path, n_train=20, n_test=10)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    _bomb(tmp_path / "train-images-idx3-ubyte.gz", (60000, 28, 28), 64 << 20)
    with pytest.raises(ValueError, match=r"has 60000 images but .* has 20 labels"):
        load_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", struct.pack(">2xBBI", 0x08, 1, 2**32 - 1))
    with pytest.raises(ValueError, match="declares 4294967295 labels, more than the 1000000"):
        load_mnist(tmp_path)
