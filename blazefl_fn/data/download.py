"""Verified, resumable, atomic downloads and safe tar extraction: the one machinery behind
every dataset download.

`download` fetches one file (from one URL, or the first of several mirrors that gives the
expected content) and promises:

- **Verified.** The content is checked against a SHA-256 or MD5 digest before it lands; with
  ``gunzip=True`` the digest is that of the decompressed content, so a mirror that recompressed
  the same file is accepted and one that changed it is not.
- **Atomic.** The destination is either absent, its previous content, or the complete verified
  file: the body grows in a hidden ``.NAME.<tag>.part`` file beside it, the verified content is
  moved into place with `os.replace`, and nothing half-written is left by an error or Ctrl-C
  (the part file excepted, which no loader reads).
- **Resumable.** An interrupted download keeps its part file; the next call asks the server for
  the rest with an HTTP ``Range`` request, and starts over when the server does not support
  ranges. A resumed file that fails its check is downloaded once more from the start.
- **One-line errors.** An unreachable server, an HTTP error or a broken connection raises
  `DownloadError` (an `OSError`) naming the URL and the reason; content that fails its check
  raises `ChecksumError` (a `ValueError`) naming the URL and both digests.

`extract_tar` unpacks an archive after checking every member. The dataset downloads
(`blazefl_fn.data.mnist.download_mnist`, `blazefl_fn.data.cifar.download_cifar10`,
`blazefl_fn.data.cifar.download_cifar100`, and ``blazefl-fn data``) are built on both.
Nothing is ever downloaded implicitly: the loaders only read local files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import importlib.util
import math
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, TextIO, cast

import attrs

from .._files import fsync_directory, holding
from ..errors import ChecksumError, DownloadError

__all__ = [
    "download",
    "extract_tar",
]

_CHUNK = 1 << 16
_TAG = 12  # hex digits of the URL's SHA-256 in a part file's name


@attrs.frozen
class _Digest:
    """The expected digest of a download: the algorithm and its lowercase hex value."""

    algorithm: Literal["sha256", "md5"]
    hexdigest: str

    def new(self) -> Any:
        return hashlib.new(self.algorithm, usedforsecurity=False)


def _expected(sha256: str | None, md5: str | None) -> _Digest:
    if (sha256 is None) == (md5 is None):
        raise ValueError("download needs exactly one of sha256= or md5=")
    algorithm: Literal["sha256", "md5"] = "sha256" if sha256 is not None else "md5"
    length = 64 if sha256 is not None else 32
    value = (sha256 if sha256 is not None else md5 or "").strip().lower()
    if len(value) != length or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{algorithm} must be {length} hex digits, got {value!r}")
    return _Digest(algorithm, value)


def check_url(url: str) -> None:
    """Refuse a URL `download` cannot fetch (only ``http``, ``https`` and ``file``).

    Raises:
        ValueError: Another scheme, or no host for ``http``/``https`` (the URL is named).
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r} (http, https or file)")
    if scheme != "file" and not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class _Bar(Protocol):
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _LineBar:
    """One line redrawn in place (``\\r``), at most five times a second: name, percent, MB."""

    def __init__(self, out: TextIO, label: str, total: int | None, initial: int) -> None:
        self._out = out
        self._label = label
        self._total = total
        self._done = initial
        self._shown = -math.inf
        self._draw(force=True)

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._shown < 0.2:
            return
        self._shown = now
        done = f"{self._done / 1e6:.1f}"
        if self._total:
            percent = min(100, self._done * 100 // self._total)
            text = f"{self._label}  {percent:3d}%  {done}/{self._total / 1e6:.1f} MB"
        else:
            text = f"{self._label}  {done} MB"
        self._out.write(f"\r{text}")
        self._out.flush()

    def update(self, n: int) -> None:
        self._done += n
        self._draw()

    def close(self) -> None:
        self._draw(force=True)
        self._out.write("\n")
        self._out.flush()


class _TqdmBar:
    """A tqdm bar in bytes, as `blazefl_fn.run.progress` draws rounds."""

    def __init__(self, out: TextIO, label: str, total: int | None, initial: int) -> None:
        from tqdm import tqdm

        size = shutil.get_terminal_size()
        self._bar: Any = tqdm(
            total=total,
            initial=initial,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=out,
            # A terminal that reports a 0x0 size would hide the bar; shutil falls back to
            # $COLUMNS x $LINES or 80x24.
            ncols=size.columns,
            nrows=size.lines,
        )

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _progress_stream(progress: bool | TextIO) -> TextIO | None:
    """Where the bar goes: ``True`` is stderr when it is a terminal, ``False`` nowhere."""
    if progress is False:
        return None
    if progress is True:
        return sys.stderr if sys.stderr.isatty() else None
    return progress


def _open_bar(out: TextIO | None, label: str, total: int | None, initial: int) -> _Bar:
    if out is None:
        return _NoBar()
    if importlib.util.find_spec("tqdm") is not None:
        return _TqdmBar(out, label, total, initial)
    return _LineBar(out, label, total, initial)


# --------------------------------------------------------------------------------------------
# Fetching into the part file
# --------------------------------------------------------------------------------------------


def _part_path(destination: Path, url: str) -> Path:
    """The hidden file a download of ``url`` into ``destination`` grows in.

    One per URL: mirrors may serve different bytes (recompressed archives), so a part from one
    is never resumed from another.
    """
    tag = hashlib.sha256(url.encode()).hexdigest()[:_TAG]
    return destination.parent / f".{destination.name}.{tag}.part"


def _remove_parts(destination: Path) -> None:
    """Remove every part file of ``destination`` (after it is in place, or refused)."""
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.[0-9a-f]{{{_TAG}}}\.part")
    with contextlib.suppress(OSError):
        for candidate in destination.parent.iterdir():
            if pattern.fullmatch(candidate.name):
                with contextlib.suppress(OSError):
                    candidate.unlink()


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a request failed, in a few words."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        inner: object = exc.reason
        if isinstance(inner, BaseException):
            return _reason(inner, timeout)
        return str(inner)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(first byte, total size)`` of a ``Content-Range`` header (None where absent or ``*``)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    first, total = match.groups()
    return (
        None if first is None else int(first),
        None if total in (None, "*") else int(total),
    )


def _open(url: str, have: int, timeout: float) -> tuple[Any, int]:
    """The response to a request for ``url`` from byte ``have`` on, and the byte it starts at.

    Returns ``(None, have)`` when the server says the first ``have`` bytes are the whole file
    (HTTP 416 with ``Content-Range: bytes */have``).
    """
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response: Any = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and have:
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == have:
                    return None, have
                return _open(url, 0, timeout)  # the part is not a prefix of this file
            raise DownloadError(f"cannot download {url}: {_reason(exc, timeout)}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadError(f"cannot download {url}: {_reason(exc, timeout)}") from exc
    status: int | None = getattr(response, "status", None)
    if have and status == 206:
        first, _ = _content_range(response.headers.get("Content-Range"))
        if first == have:
            return response, have
        response.close()
        return _open(url, 0, timeout)  # a range other than the one asked for: start over
    return response, 0  # 200 (or a file: URL): the whole body, from the start


def _open_part(part: Path, *, append: bool) -> BinaryIO:
    """``part`` opened to append to (or to rewrite), never through a symbolic link planted
    there: what a link points at is not overwritten."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(part, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    return os.fdopen(fd, "ab" if append else "wb")


def _fetch(url: str, part: Path, timeout: float, out: TextIO | None) -> bool:
    """Complete ``part`` with ``url``'s body; True if it resumed what an earlier call left.

    Raises:
        DownloadError: The request failed or the connection broke (what arrived is kept).
    """
    have = part.stat().st_size if part.is_file() else 0
    response, start = _open(url, have, timeout)
    if response is None:
        return True
    label = Path(urllib.parse.urlsplit(url).path).name or url
    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        total = None if length is None else start + length
        bar = _open_bar(out, label, total, start)
        received = 0
        try:
            with _open_part(part, append=start > 0) as file:
                while True:
                    try:
                        chunk: bytes = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException, ValueError) as exc:
                        raise DownloadError(
                            f"cannot download {url}: the connection broke after "
                            f"{start + received} bytes ({_reason(exc, timeout)}); "
                            "the next call resumes it"
                        ) from exc
                    if not chunk:
                        break
                    file.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
            if not start and not received:
                with contextlib.suppress(OSError):
                    part.unlink()  # nothing arrived: leave nothing behind
    if length is not None and received != length:
        raise DownloadError(
            f"cannot download {url}: the connection closed after {start + received} of "
            f"{total} bytes; the next call resumes it"
        )
    return start > 0


# --------------------------------------------------------------------------------------------
# Verifying and installing
# --------------------------------------------------------------------------------------------


def _copy_digest(
    source: BinaryIO, digest: _Digest, size: int | None, sink: BinaryIO | None, name: str
) -> str:
    """The digest of ``source``'s content (copied to ``sink`` if given), refusing more than
    ``size`` bytes as soon as they appear."""
    h = digest.new()
    seen = 0
    while chunk := source.read(_CHUNK):
        seen += len(chunk)
        if size is not None and seen > size:
            raise ChecksumError(f"{name}: more than the expected {size} bytes")
        h.update(chunk)
        if sink is not None:
            sink.write(chunk)
    if size is not None and seen != size:
        raise ChecksumError(f"{name}: {seen} bytes, expected {size}")
    return cast(str, h.hexdigest())


def _check(
    path: Path, digest: _Digest, size: int | None, gunzip: bool, sink: BinaryIO | None, name: str
) -> None:
    """Check ``path``'s content (decompressed first with ``gunzip``, and copied to ``sink``).

    Raises:
        ChecksumError: Another digest or size, or not a complete gzip stream (``name`` says
            where the content came from).
        OSError: ``path`` cannot be read.
    """
    with open(path, "rb") as raw:
        if not gunzip:
            if size is not None and (found := os.fstat(raw.fileno()).st_size) != size:
                raise ChecksumError(f"{name}: {found} bytes, expected {size}")
            got = _copy_digest(raw, digest, size, sink, name)
        else:
            try:
                with gzip.GzipFile(fileobj=raw) as stream:
                    got = _copy_digest(cast(BinaryIO, stream), digest, size, sink, name)
            except (OSError, EOFError, zlib.error) as exc:
                raise ChecksumError(f"{name}: not a complete gzip stream ({exc})") from exc
    if got != digest.hexdigest:
        of = " of the decompressed content" if gunzip else ""
        raise ChecksumError(
            f"{name}: {digest.algorithm}{of} mismatch, expected {digest.hexdigest}, got {got}"
        )


def _is_verified(path: Path, digest: _Digest, size: int | None, *, gunzip: bool = False) -> bool:
    """Whether ``path`` is a regular file whose content has ``digest`` (and ``size``)."""
    if not path.is_file():
        return False
    try:
        _check(path, digest, size, gunzip, None, str(path))
    except (OSError, ValueError):
        return False
    return True


def has_content(
    path: str | os.PathLike[str], sha256: str, *, size: int | None = None, gunzip: bool = False
) -> bool:
    """Whether ``path`` is a regular file whose content (decompressed first with ``gunzip``)
    has this SHA-256 and, if given, ``size`` bytes; an unreadable or broken file has not."""
    return _is_verified(Path(path), _expected(sha256, None), size, gunzip=gunzip)


def _install(
    url: str, part: Path, target: Path, digest: _Digest, size: int | None, gunzip: bool
) -> None:
    """Check ``part`` and move its verified content to ``target``: the part itself, or with
    ``gunzip`` its content decompressed into a temporary file beside ``target``.

    Raises:
        ChecksumError: The content is not the expected one (nothing is moved).
    """
    if not gunzip:
        _check(part, digest, size, False, None, url)
        with open(part, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(part, target)
        fsync_directory(target.parent)
        return
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            _check(part, digest, size, True, sink, url)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_directory(target.parent)


def _fetch_and_install(
    url: str,
    target: Path,
    digest: _Digest,
    size: int | None,
    gunzip: bool,
    timeout: float,
    out: TextIO | None,
) -> None:
    """One source's try: complete its part file, then check and install it."""
    part = _part_path(target, url)
    for attempt in range(2):
        resumed = _fetch(url, part, timeout, out)
        try:
            _install(url, part, target, digest, size, gunzip)
            return
        except ChecksumError:
            with contextlib.suppress(OSError):
                part.unlink()
            if not resumed or attempt:
                raise
            # The part may mix two versions of the file: once more, from the start.


def download(
    url: str | Sequence[str],
    destination: str | os.PathLike[str],
    sha256: str | None = None,
    *,
    md5: str | None = None,
    gunzip: bool = False,
    size: int | None = None,
    timeout: float = 60.0,
    progress: bool | TextIO = True,
) -> Path:
    """Download ``url`` to ``destination``, verified against exactly one of ``sha256``/``md5``.

    The body grows in a hidden part file beside ``destination`` (``.NAME.<tag>.part``, one per
    URL), which is verified and then moved into place with `os.replace`: ``destination`` is
    either absent, its previous content, or the complete verified file, never a partial one,
    also on an error or Ctrl-C. An interrupted download keeps its part file, and the next call
    resumes it with an HTTP ``Range`` request (or starts over where the server ignores ranges);
    a resumed file that fails its check is fetched once more from the start. If
    ``destination`` already holds the expected content, nothing is downloaded. One process at
    a time downloads into ``destination`` (a lock file ``.NAME.lock`` beside it).

    Args:
        url: an ``http``, ``https`` or ``file`` URL, or several (mirrors of one file), tried in
            order until one gives the expected content.
        destination: the file to write (its directory is created if missing).
        sha256: the expected SHA-256 of the content, 64 hex digits.
        md5: the expected MD5 instead (as some publishers list only that), 32 hex digits.
        gunzip: the body is a gzip stream: ``destination`` receives the decompressed content,
            and the digest and ``size`` are those of the decompressed content (so mirrors that
            compressed the same file differently all pass).
        size: the content's size in bytes, if known: checked first, and decompression stops
            one byte past it (a "gzip bomb" fills no disk).
        timeout: seconds to wait for the server at each step (connect, each read).
        progress: ``True`` draws a progress bar on stderr when stderr is a terminal; a stream
            draws it there; ``False`` draws nothing.

    Returns:
        ``destination`` as a `Path`.

    Raises:
        DownloadError: No source could be reached, answered without an HTTP error, or kept
            the connection to the end (an `OSError`; one line naming each URL and its reason).
        ChecksumError: The content fails its check (a `ValueError` naming the URL and both
            digests; the download is discarded and ``destination`` left as it was); with
            several URLs, when at least one gave content and none the expected one.
        ValueError: Not exactly one digest, a malformed digest, no URL, an unsupported URL,
            or a bad ``size`` or ``timeout``; or ``destination`` is not a regular file.
        OutputLockedError: Another process is downloading into ``destination``.

    Examples:
        >>> import hashlib, pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     source = pathlib.Path(d, "hello.txt")
        ...     _ = source.write_bytes(b"hello")
        ...     sha = hashlib.sha256(b"hello").hexdigest()
        ...     download(source.as_uri(), pathlib.Path(d, "copy", "hello.txt"), sha).read_bytes()
        b'hello'
    """
    digest = _expected(sha256, md5)
    urls = (url,) if isinstance(url, str) else tuple(url)
    if not urls:
        raise ValueError("download needs at least one URL")
    for each in urls:
        check_url(each)
    if size is not None and (isinstance(size, bool) or size < 0):
        raise ValueError(f"size must be an integer >= 0 or None, got {size!r}")
    if not 0 < timeout < math.inf:  # NaN fails too
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    target = Path(destination)
    if _is_verified(target, digest, size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    out = _progress_stream(progress)
    failures: list[DownloadError | ChecksumError] = []
    with holding(target, f"download of {target}"):
        if _is_verified(target, digest, size):  # another process finished it meanwhile
            return target
        for each in urls:
            try:
                _fetch_and_install(each, target, digest, size, gunzip, timeout, out)
            except (DownloadError, ChecksumError) as exc:
                failures.append(exc)
                continue
            _remove_parts(target)
            return target
    if len(failures) == 1:
        raise failures[0]
    text = f"cannot download {target.name} from any of {len(urls)} sources: " + "; ".join(
        str(exc) for exc in failures
    )
    if all(isinstance(exc, DownloadError) for exc in failures):
        raise DownloadError(text) from failures[-1]
    raise ChecksumError(text) from failures[-1]


# --------------------------------------------------------------------------------------------
# Safe tar extraction
# --------------------------------------------------------------------------------------------


def _check_member(archive: str, member: tarfile.TarInfo) -> None:
    """Refuse absolute paths, ``..`` components, links leaving the tree and special files."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or posixpath.isabs(name) or ".." in name.split("/"):
        raise ValueError(f"{archive}: unsafe member path {member.name!r}")
    if member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        if link.startswith("/"):
            raise ValueError(f"{archive}: member {member.name!r} links to absolute {link!r}")
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, link))
        if resolved == ".." or resolved.startswith("../"):
            raise ValueError(f"{archive}: member {member.name!r} links outside to {link!r}")
    elif not (member.isfile() or member.isdir()):
        raise ValueError(f"{archive}: member {member.name!r} is not a regular file or folder")


def extract_tar(archive: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
    """Safely extract a (possibly gzip-compressed) tar ``archive`` into ``directory``.

    Every member is checked first (no absolute paths, no ``..`` components, no links out of
    the tree, no devices); then extraction uses tarfile's ``"data"`` filter where available.

    Returns:
        ``directory`` as a `Path`.

    Raises:
        FileNotFoundError: ``archive`` does not exist.
        ValueError: The archive is corrupt or holds an unsafe member (nothing is extracted).
    """
    name = os.fspath(archive)
    root = Path(directory)
    if not Path(name).is_file():
        raise FileNotFoundError(f"tar archive not found: {name}")
    try:
        with tarfile.open(name, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(name, member)
            root.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706; members were checked above
                tar.extractall(root, members=members)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{name}: corrupt archive ({type(e).__name__}: {e})") from e
    return root
