"""Tests for the verified, resumable, atomic downloads (`blazefl_fn.data.download`), the MNIST
and CIFAR downloads built on them, ``blazefl-fn data``, and the safe tar extractor.

No network: every server is a ``http.server`` on 127.0.0.1 (port 0, in a thread) serving the
real MNIST ``.gz`` files, corrupt variants, or tiny CIFAR archives, with or without ``Range``
support, and able to drop the connection mid-file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import importlib
import io
import os
import pickle
import re
import socket
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from _cli import run_cli
from _paths import mnist_dir

from blazefl_fn.cli._commands import main
from blazefl_fn.data import cifar, load_cifar10, load_mnist
from blazefl_fn.data.download import download, extract_tar
from blazefl_fn.data.mnist import MNIST_MIRRORS, download_mnist
from blazefl_fn.errors import ChecksumError, DownloadError

# The module, not the function `blazefl_fn.data.download` that shares its name.
dl_module = importlib.import_module("blazefl_fn.data.download")

# The original MNIST IDX files, as every reference lists them (size, SHA-256).
MNIST = {
    "train-images-idx3-ubyte": (
        47_040_016,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        60_008,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        7_840_016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        10_008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}
LABELS = "train-labels-idx1-ubyte"
LABELS_SIZE, LABELS_SHA = MNIST[LABELS]


# --------------------------------------------------------------------------------------------
# A local HTTP server


@attrs.define
class Served:
    """One request as the server saw it."""

    path: str
    range: str | None
    status: int
    body_bytes: int


@attrs.define
class Site:
    """What a test server serves, and what it was asked."""

    files: dict[str, bytes]
    ranges: bool = True  # honour Range requests (206 / 416)
    cut_after: int | None = None  # the next body stops after this many bytes, connection dropped
    log: list[Served] = attrs.field(factory=list[Served])


def _handler(site: Site) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            body = site.files.get(name)
            asked = self.headers.get("Range")
            if body is None:
                self.send_error(404)
                site.log.append(Served(name, asked, 404, 0))
                return
            start = 0
            if asked is not None and site.ranges:
                match = re.fullmatch(r"bytes=(\d+)-", asked)
                assert match is not None, asked
                start = int(match[1])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    site.log.append(Served(name, asked, 416, 0))
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            if site.cut_after is not None:
                payload, site.cut_after = payload[: site.cut_after], None
                self.close_connection = True
            self.wfile.write(payload)
            self.wfile.flush()
            site.log.append(Served(name, asked, 206 if start else 200, len(payload)))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[[Site], str]]:
    """Start a server for a `Site`; returns its base URL. All are stopped after the test."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(site: Site) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def refused() -> Iterator[str]:
    """A base URL where nothing listens: a port bound (so no one else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"


@pytest.fixture(scope="module")
def mnist_gz() -> dict[str, bytes]:
    """The four real MNIST ``.gz`` files, by name."""
    directory = mnist_dir()
    if directory is None:
        pytest.skip("MNIST not found (set BLAZEFL_FN_MNIST_DIR)")
    return {f"{stem}.gz": (directory / f"{stem}.gz").read_bytes() for stem in MNIST}


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_labels(url: str | list[str], dest: Path, **kwargs: Any) -> Path:
    """The real train labels, as `download_mnist` fetches each file."""
    return download(url, dest, LABELS_SHA, gunzip=True, size=LABELS_SIZE, **kwargs)


# --------------------------------------------------------------------------------------------
# MNIST end to end


def test_pins_are_the_real_mnist(mnist_gz: dict[str, bytes]) -> None:
    # Computed here from the files, independently of the module's table.
    for stem, (size, digest) in MNIST.items():
        content = gzip.decompress(mnist_gz[f"{stem}.gz"])
        assert (len(content), hashlib.sha256(content).hexdigest()) == (size, digest)
    assert MNIST_MIRRORS == (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    )


def test_download_mnist_loads_and_a_second_run_downloads_nothing(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    site = Site(dict(mnist_gz))
    root = download_mnist(tmp_path / "mnist", mirrors=[serve(site)])
    assert root == tmp_path / "mnist"
    assert listing(root) == sorted(MNIST)  # the raw IDX files, nothing hidden left over
    for stem, (size, digest) in MNIST.items():
        assert (root / stem).stat().st_size == size
        assert sha256(root / stem) == digest
    assert sorted(s.path for s in site.log) == sorted(mnist_gz)
    train, test = load_mnist(root)
    assert (len(train), len(test)) == (60_000, 10_000)

    requests = len(site.log)
    assert download_mnist(root, mirrors=[serve(site)]) == root
    assert len(site.log) == requests


def test_files_the_loader_already_reads_are_not_downloaded(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    root = tmp_path / "mnist"
    root.mkdir()
    for name, data in mnist_gz.items():
        if name != f"{LABELS}.gz":
            (root / name).write_bytes(data)  # verified .gz files stay as they are
    (root / LABELS).write_bytes(b"\0\0\x08\x01\0\0\0\x01\x07")  # a raw file, wrong content
    site = Site(dict(mnist_gz))
    download_mnist(root, mirrors=[serve(site)])
    assert [s.path for s in site.log] == [f"{LABELS}.gz"]
    assert sha256(root / LABELS) == LABELS_SHA
    assert listing(root) == sorted([*(n for n in mnist_gz if n != f"{LABELS}.gz"), LABELS])


def test_offline_is_one_line_naming_each_mirror(tmp_path: Path, refused: str) -> None:
    with pytest.raises(DownloadError) as caught:
        download_mnist(tmp_path / "m", mirrors=[refused, refused + "other/"])
    text = str(caught.value)
    assert isinstance(caught.value, OSError)
    assert "\n" not in text
    assert f"cannot download {refused}train-images-idx3-ubyte.gz: connection refused" in text
    assert f"{refused}other/train-images-idx3-ubyte.gz: connection refused" in text
    assert listing(tmp_path / "m") == []


def test_cli_offline_is_one_line_exit_1(
    tmp_path: Path, refused: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["data", "mnist", str(tmp_path / "m"), "--mirror", refused])
    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert err == (
        f"blazefl-fn: error: cannot download {refused}train-images-idx3-ubyte.gz: "
        "connection refused\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mirror", "ftp://host/mnist/"], "argument --mirror: unsupported URL scheme 'ftp'"),
        (["--timeout", "0"], "argument --timeout: must be a positive number of seconds"),
        (["--timeout", "nan"], "argument --timeout: must be a positive number of seconds"),
    ],
)
def test_cli_bad_flags_exit_2(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "mnist", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blazefl-fn: error: {message}")
    assert err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_cli_ctrl_c_says_the_download_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr("blazefl_fn.cli._commands.download_mnist", interrupted)
    assert main(["data", "mnist", str(tmp_path / "m")]) == 130
    assert capsys.readouterr().err == (
        f"blazefl-fn: interrupted; the partial download is kept, hidden, in {tmp_path / 'm'}: "
        "run the same command again to continue it\n"
    )


@pytest.mark.slow
def test_cli_end_to_end_then_nothing_again(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    site = Site(dict(mnist_gz))
    url = serve(site)
    root = tmp_path / "data" / "mnist"
    done = run_cli("data", "mnist", str(root), "--mirror", url, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no terminal: no progress bar
    assert done.stdout == (
        f"mnist is ready in {root}; use it with: blazefl-fn run --dataset mnist --data-dir {root}\n"
    )
    assert listing(root) == sorted(MNIST)
    train, test = load_mnist(root)
    assert (len(train), len(test)) == (60_000, 10_000)
    requests = len(site.log)
    again = run_cli("data", "mnist", str(root), "--mirror", url, "--quiet", timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(site.log) == requests


# --------------------------------------------------------------------------------------------
# Wrong content: refused, nothing left


def _corrupt(content: bytes) -> bytes:
    flipped = bytearray(content)
    flipped[-1] ^= 0xFF
    return gzip.compress(bytes(flipped))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            lambda real: _corrupt(gzip.decompress(real)),
            "sha256 of the decompressed content mismatch",
        ),
        (lambda real: gzip.decompress(real), "not a complete gzip stream"),
        (lambda real: real[: len(real) // 2], "not a complete gzip stream"),
        (lambda real: gzip.compress(gzip.decompress(real) + b"\0"), "more than the expected 60008"),
        (lambda real: gzip.compress(gzip.decompress(real)[:-1]), "60007 bytes, expected 60008"),
    ],
    ids=["other-content", "not-gzip", "truncated-gzip", "too-long", "too-short"],
)
def test_wrong_content_is_refused_and_leaves_nothing(
    tmp_path: Path,
    serve: Callable[[Site], str],
    mnist_gz: dict[str, bytes],
    body: Callable[[bytes], bytes],
    message: str,
) -> None:
    url = serve(Site({"x.gz": body(mnist_gz[f"{LABELS}.gz"])})) + "x.gz"
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match=re.escape(message)) as caught:
        fetch_labels(url, out / LABELS)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(url)
    assert listing(out) == []  # no file, no part, no temporary file, no lock


def test_wrong_content_from_every_mirror_leaves_mnist_dir_empty(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    files = dict(mnist_gz)
    size, digest = MNIST["train-images-idx3-ubyte"]
    files["train-images-idx3-ubyte.gz"] = gzip.compress(bytes(size), compresslevel=1)
    site = Site(files)
    with pytest.raises(ChecksumError, match=f"expected {digest}, got"):
        download_mnist(tmp_path / "m", mirrors=[serve(site)])
    assert listing(tmp_path / "m") == []


def test_the_next_mirror_serves_what_the_first_did_not(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes], refused: str
) -> None:
    real = mnist_gz[f"{LABELS}.gz"]
    bad = serve(Site({"x.gz": _corrupt(gzip.decompress(real))})) + "x.gz"
    # Another compression of the same content: accepted, as the pin is of the content.
    recompressed = gzip.compress(gzip.decompress(real), compresslevel=1)
    assert recompressed != real
    good = serve(Site({"x.gz": recompressed})) + "x.gz"
    dest = fetch_labels([refused + "x.gz", bad, good], tmp_path / LABELS)
    assert sha256(dest) == LABELS_SHA
    assert listing(tmp_path) == [LABELS]


def test_the_sources_that_all_failed_are_named_and_typed(
    tmp_path: Path, serve: Callable[[Site], str], refused: str
) -> None:
    missing = serve(Site({})) + "x.gz"
    with pytest.raises(DownloadError, match="from any of 2 sources") as caught:
        fetch_labels([refused + "x.gz", missing], tmp_path / LABELS)
    assert f"{missing}: HTTP 404" in str(caught.value)
    bad = serve(Site({"x.gz": b"not gzip"})) + "x.gz"
    with pytest.raises(ChecksumError, match="from any of 2 sources"):
        fetch_labels([missing, bad], tmp_path / LABELS)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Resuming


def _only_part(directory: Path) -> Path:
    names = listing(directory)
    assert len(names) == 1, names
    assert re.fullmatch(rf"\.{LABELS}\.[0-9a-f]{{12}}\.part", names[0]), names
    return directory / names[0]


@pytest.mark.parametrize("ranges", [True, False])
def test_a_server_that_dies_mid_file_then_a_second_call_resumes(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes], ranges: bool
) -> None:
    real = mnist_gz[f"{LABELS}.gz"]
    site = Site({"x.gz": real}, ranges=ranges, cut_after=10_000)
    url = serve(site) + "x.gz"
    with pytest.raises(DownloadError, match=f"closed after 10000 of {len(real)} bytes") as caught:
        fetch_labels(url, tmp_path / LABELS)
    assert "\n" not in str(caught.value)
    assert _only_part(tmp_path).read_bytes() == real[:10_000]  # nothing the loader would read

    dest = fetch_labels(url, tmp_path / LABELS)
    assert sha256(dest) == LABELS_SHA
    assert listing(tmp_path) == [LABELS]
    second = site.log[-1]
    assert second.range == "bytes=10000-"  # asked for the rest either way
    if ranges:
        assert (second.status, second.body_bytes) == (206, len(real) - 10_000)
    else:  # the server ignored it: started over
        assert (second.status, second.body_bytes) == (200, len(real))


def test_a_connection_dropped_before_any_byte_leaves_nothing(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    real = mnist_gz[f"{LABELS}.gz"]
    url = serve(Site({"x.gz": real}, cut_after=0)) + "x.gz"
    with pytest.raises(DownloadError, match=f"closed after 0 of {len(real)} bytes"):
        fetch_labels(url, tmp_path / LABELS)
    assert listing(tmp_path) == []


def test_a_part_is_resumed_only_from_its_own_url(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    real = mnist_gz[f"{LABELS}.gz"]
    first = serve(Site({"x.gz": real}, cut_after=10_000)) + "x.gz"
    with pytest.raises(DownloadError):
        fetch_labels(first, tmp_path / LABELS)
    _only_part(tmp_path)
    # Another mirror compressed the same content otherwise: its bytes are not the part's.
    other = Site({"x.gz": gzip.compress(gzip.decompress(real), compresslevel=1)})
    fetch_labels(serve(other) + "x.gz", tmp_path / LABELS)
    assert [(s.range, s.status) for s in other.log] == [(None, 200)]
    assert sha256(tmp_path / LABELS) == LABELS_SHA
    assert listing(tmp_path) == [LABELS]  # the first mirror's part is gone too


def test_a_link_planted_as_the_part_file_is_not_written_through(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    url = serve(Site({"x.gz": mnist_gz[f"{LABELS}.gz"]})) + "x.gz"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    dl_module._part_path(out / LABELS, url).symlink_to(victim)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        fetch_labels(url, out / LABELS)
    assert victim.read_bytes() == b"precious"
    assert not (out / LABELS).exists()


def test_a_resumed_part_of_another_version_is_fetched_again(
    tmp_path: Path, serve: Callable[[Site], str], mnist_gz: dict[str, bytes]
) -> None:
    real = mnist_gz[f"{LABELS}.gz"]
    site = Site({"x.gz": real}, cut_after=10_000)
    url = serve(site) + "x.gz"
    with pytest.raises(DownloadError):
        fetch_labels(url, tmp_path / LABELS)
    _only_part(tmp_path).write_bytes(bytes(10_000))  # the file changed on the server since
    dest = fetch_labels(url, tmp_path / LABELS)
    assert sha256(dest) == LABELS_SHA
    assert [(s.range, s.status) for s in site.log[1:]] == [("bytes=10000-", 206), (None, 200)]
    assert listing(tmp_path) == [LABELS]


class _Interrupting:
    """A progress bar that presses Ctrl-C once ``after`` bytes have arrived."""

    def __init__(self, after: int) -> None:
        self.after = after

    def update(self, n: int) -> None:
        self.after -= n
        if self.after <= 0:
            raise KeyboardInterrupt

    def close(self) -> None:
        pass


def test_ctrl_c_while_downloading_keeps_only_the_part_and_resumes(
    tmp_path: Path,
    serve: Callable[[Site], str],
    mnist_gz: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stem = "t10k-images-idx3-ubyte"  # 1.6 MB: many reads
    size, digest = MNIST[stem]
    real = mnist_gz[f"{stem}.gz"]
    site = Site({"x.gz": real})
    url = serve(site) + "x.gz"
    with monkeypatch.context() as patch:
        patch.setattr(dl_module, "_open_bar", lambda *_: _Interrupting(100_000))
        with pytest.raises(KeyboardInterrupt):
            download(url, tmp_path / stem, digest, gunzip=True, size=size)
    names = listing(tmp_path)  # the part alone: no destination, temporary file or lock
    assert len(names) == 1
    assert re.fullmatch(rf"\.{stem}\.[0-9a-f]{{12}}\.part", names[0]), names
    have = (tmp_path / names[0]).stat().st_size
    assert 100_000 <= have < len(real)
    assert (tmp_path / names[0]).read_bytes() == real[:have]
    download(url, tmp_path / stem, digest, gunzip=True, size=size)
    assert (site.log[-1].range, site.log[-1].status) == (f"bytes={have}-", 206)
    assert sha256(tmp_path / stem) == digest
    assert listing(tmp_path) == [stem]


def test_ctrl_c_while_decompressing_leaves_no_half_written_file(
    tmp_path: Path,
    serve: Callable[[Site], str],
    mnist_gz: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = mnist_gz[f"{LABELS}.gz"]
    site = Site({"x.gz": real})
    url = serve(site) + "x.gz"
    copy = dl_module._copy_digest

    def interrupted(source: Any, digest: Any, size: Any, sink: Any, name: str) -> str:
        sink.write(b"half of it")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(dl_module, "_copy_digest", interrupted)
        with pytest.raises(KeyboardInterrupt):
            fetch_labels(url, tmp_path / LABELS)
    assert _only_part(tmp_path).read_bytes() == real  # the whole body, kept; no temporary file
    assert dl_module._copy_digest is copy
    # The server says the part is the whole file (416): installed without a byte sent again.
    fetch_labels(url, tmp_path / LABELS)
    assert (site.log[-1].range, site.log[-1].status) == (f"bytes={len(real)}-", 416)
    assert sha256(tmp_path / LABELS) == LABELS_SHA
    assert listing(tmp_path) == [LABELS]


# --------------------------------------------------------------------------------------------
# The generic download


def test_sha256_md5_and_an_existing_verified_file(tmp_path: Path, refused: str) -> None:
    src = tmp_path / "src.bin"
    payload = b"hello cifar" * 1000
    src.write_bytes(payload)
    out = tmp_path / "out"
    got = download(src.as_uri(), out / "a.bin", hashlib.sha256(payload).hexdigest())
    assert got == out / "a.bin"
    assert got.read_bytes() == payload
    got = download(src.as_uri(), out / "b.bin", md5=hashlib.md5(payload).hexdigest().upper())
    assert got.read_bytes() == payload
    assert listing(out) == ["a.bin", "b.bin"]
    # Already there and verified: the (unreachable) source is never asked.
    assert download(refused + "a.bin", got, md5=hashlib.md5(payload).hexdigest()) == got


def test_a_mismatch_keeps_the_previous_content(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"new content")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"old content")
    with pytest.raises(ChecksumError, match=r"sha256 mismatch, expected 0{64}, got [0-9a-f]{64}"):
        download(src.as_uri(), out / "a.bin", "0" * 64)
    assert listing(out) == ["a.bin"]
    assert (out / "a.bin").read_bytes() == b"old content"
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        download(src.as_uri(), out / "b.bin", md5="f" * 32)
    assert listing(out) == ["a.bin"]


def test_failures_name_the_url_and_leave_nothing(
    tmp_path: Path, serve: Callable[[Site], str], refused: str
) -> None:
    out = tmp_path / "out"
    missing = (tmp_path / "missing").as_uri()
    with pytest.raises(DownloadError, match=f"cannot download {re.escape(missing)}: "):
        download(missing, out / "a.bin", "0" * 64)
    url = serve(Site({})) + "nothing.gz"
    with pytest.raises(DownloadError, match=f"cannot download {url}: HTTP 404 Not Found$"):
        download(url, out / "a.bin", "0" * 64)
    with pytest.raises(DownloadError, match=r"connection refused$"):
        download(refused, out / "a.bin", "0" * 64)
    assert listing(out) == []


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "exactly one"),
        (("0" * 64,), {"md5": "0" * 32}, "exactly one"),
        (("abc",), {}, "64 hex digits"),
        ((), {"md5": "z" * 32}, "32 hex digits"),
        (("0" * 64,), {"size": -1}, "size must be an integer >= 0"),
        (("0" * 64,), {"timeout": 0}, "timeout must be a positive number"),
        (("0" * 64,), {"timeout": float("nan")}, "timeout must be a positive number"),
    ],
)
def test_argument_errors(
    tmp_path: Path, args: tuple[str, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        download((tmp_path / "src").as_uri(), tmp_path / "x", *args, **kwargs)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.invalid/x", "scheme 'ftp'"),
        ("https:///x", "no host in URL"),
        ([], "at least one URL"),
    ],
)
def test_urls_it_cannot_fetch(tmp_path: Path, url: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        download(url, tmp_path / "x", "0" * 64)


def test_mnist_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one mirror"):
        download_mnist(tmp_path / "m", mirrors=[])
    with pytest.raises(ValueError, match="scheme 'ftp'"):
        download_mnist(tmp_path / "m", mirrors=["ftp://host/mnist/"])
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        download_mnist(tmp_path / "m", timeout=-1)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        download_mnist(tmp_path / "file")
    assert listing(tmp_path) == ["file"]


# --------------------------------------------------------------------------------------------
# Progress


def test_progress_goes_to_the_given_stream_and_not_to_a_non_terminal(
    tmp_path: Path,
    serve: Callable[[Site], str],
    mnist_gz: dict[str, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = serve(Site({f"{LABELS}.gz": mnist_gz[f"{LABELS}.gz"]})) + f"{LABELS}.gz"
    fetch_labels(url, tmp_path / "a" / LABELS)  # progress=True: stderr is not a terminal here
    assert capsys.readouterr().err == ""
    out = io.StringIO()
    fetch_labels(url, tmp_path / "b" / LABELS, progress=out)
    drawn = out.getvalue()
    assert f"{LABELS}.gz" in drawn
    assert "100%" in drawn
    assert drawn.endswith("\n")


def test_the_plain_bar_without_tqdm() -> None:
    out = io.StringIO()
    bar = dl_module._LineBar(out, "file.gz", 2_000_000, 500_000)
    bar.update(1_500_000)
    bar.close()
    lines = out.getvalue().split("\r")
    assert lines[1] == "file.gz   25%  0.5/2.0 MB"
    assert lines[-1] == "file.gz  100%  2.0/2.0 MB\n"


# --------------------------------------------------------------------------------------------
# CIFAR


def _cifar10_archive(path: Path) -> bytes:
    """A CIFAR-10 python archive with 2 images per batch, as the publisher lays it out."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        names = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
        for k, name in enumerate(names):
            batch = {
                b"data": np.full((2, 3072), k, dtype=np.uint8),
                b"labels": [k % 10, (k + 1) % 10],
            }
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_download_cifar10_extracts_atomically_and_not_twice(
    tmp_path: Path,
    serve: Callable[[Site], str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive = _cifar10_archive(tmp_path / "archive.tar.gz")
    site = Site({"cifar-10-python.tar.gz": archive})
    url = serve(site)
    root = tmp_path / "cifar10"
    # The published digest refuses the fake archive, and nothing is left.
    with pytest.raises(ChecksumError, match=f"md5 mismatch, expected {cifar.CIFAR10_PYTHON_MD5}"):
        cifar.download_cifar10(root, mirrors=[url])
    assert listing(root) == []

    monkeypatch.setattr(cifar, "CIFAR10_PYTHON_MD5", hashlib.md5(archive).hexdigest())
    assert main(["data", "cifar10", str(root), "--mirror", url]) == 0
    assert "cifar10 is ready in" in capsys.readouterr().out
    assert listing(root) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    train, test = load_cifar10(root)
    assert (len(train), len(test)) == (10, 2)
    requests = len(site.log)
    assert cifar.download_cifar10(root, mirrors=[url]) == root
    assert len(site.log) == requests


def test_cifar_archive_without_its_folder_extracts_nothing(
    tmp_path: Path, serve: Callable[[Site], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("other/file")
        tar.addfile(info, io.BytesIO(b""))
    archive = buffer.getvalue()
    url = serve(Site({"cifar-100-python.tar.gz": archive}))
    monkeypatch.setattr(cifar, "CIFAR100_PYTHON_MD5", hashlib.md5(archive).hexdigest())
    with pytest.raises(ValueError, match="holds no cifar-100-python/ folder"):
        cifar.download_cifar100(tmp_path, mirrors=[url])
    assert listing(tmp_path) == ["cifar-100-python.tar.gz"]  # verified, kept; nothing extracted


def test_the_cifar_names_are_the_download_module_s() -> None:
    # One implementation: the old spellings are the same functions.
    assert cifar.download is download
    assert cifar.extract_tar is extract_tar
    assert cifar.CIFAR10_PYTHON_MD5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar.CIFAR100_PYTHON_MD5 == "eb9058c3a382ffc7106e4002c42a8d85"


# --------------------------------------------------------------------------------------------
# Tar extraction


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ((tarfile.TarInfo("/etc/evil"), b"x"), "unsafe member path"),
        ((tarfile.TarInfo("a/../../evil"), b"x"), "unsafe member path"),
        ((tarfile.TarInfo("../evil"), b"x"), "unsafe member path"),
        ((_link("a/link", "../../outside"), None), "links outside"),
        ((_link("link", "/etc/passwd"), None), "absolute"),
        ((_link("hard", "../x", tarfile.LNKTYPE), None), "links outside"),
        ((_link("dev", "", tarfile.CHRTYPE), None), "not a regular file"),
    ],
)
def test_extract_rejects_unsafe_members(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], message: str
) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [(tarfile.TarInfo("ok.txt"), b"fine"), member])
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match=message):
        extract_tar(archive, out)
    assert not out.exists()  # nothing extracted, not even the safe member
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "deep" / "evil").exists()


def test_extract_safe_archive_with_internal_link(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "a.tar.gz",
        [(tarfile.TarInfo("d/ok.txt"), b"fine"), (_link("d/alias", "ok.txt"), None)],
    )
    out = extract_tar(archive, tmp_path / "out")
    assert (out / "d" / "ok.txt").read_bytes() == b"fine"
    assert (out / "d" / "alias").read_bytes() == b"fine"


def test_extract_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        extract_tar(tmp_path / "missing.tar.gz", tmp_path / "out")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match=r"bad\.tar\.gz: corrupt archive"):
        extract_tar(bad, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
