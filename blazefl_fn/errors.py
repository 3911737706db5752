"""Every exception and warning the library raises for users to catch, in one place.

A client's failure is a `ClientError` (a `ChunkError` for a vectorised chunk, a `WorkerError`
when a worker process died), with the original exception chained; a diverged update is a
`NonFiniteError`; a client that reads state its algorithm never dispatched a `MissingStage`; a
client that drew from torch's global generator a `GlobalRNGError`. Files: `OutputLockedError`
(another process writes the output), `SpillError` (client-state spill files), `DownloadError`
and `ChecksumError` (dataset downloads). `PerClientFallback` warns that `Vectorized` runs an
update one client at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "ChecksumError",
    "ChunkError",
    "ClientError",
    "DownloadError",
    "GlobalRNGError",
    "MissingStage",
    "NonFiniteError",
    "OutputLockedError",
    "PerClientFallback",
    "SpillError",
    "WorkerError",
]


def _id_span(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    return f"[{shown}{', ...' if len(ids) > 5 else ''}] ({len(ids)} clients)"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _id_list(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


class ClientError(RuntimeError):
    """A client's update raised; the original exception is chained as ``__cause__``.

    ``round_index`` is 0-based (the `ServerState.round` the round started from); the message
    counts rounds from 1, as the progress lines and the metrics log do.
    """

    def __init__(self, client_id: int, round_index: int, cause: BaseException) -> None:
        super().__init__(
            f"client {client_id} failed in round {round_index + 1}: {type(cause).__name__}: {cause}"
        )
        self.client_id = client_id
        self.round_index = round_index


class ChunkError(ClientError):
    """A vectorised chunk of clients failed; ``client_id`` is its first client."""

    def __init__(self, client_ids: Sequence[int], round_index: int, cause: BaseException) -> None:
        RuntimeError.__init__(
            self,
            f"the chunk of clients {_id_span(client_ids)} failed in round {round_index + 1}: "
            f"{type(cause).__name__}: {cause}",
        )
        self.client_id = client_ids[0]
        self.client_ids = tuple(client_ids)
        self.round_index = round_index


class NonFiniteError(RuntimeError):
    """A round produced NaN or infinite values: in clients' uplinks, or in the new server state.

    Attributes:
        round_index: the round, 0-based (the message counts from 1).
        clients: each offending client's id and the entries that were not finite (empty when
            the server model is the culprit).
        server: the new server state's non-finite entries: parameter names, and places in
            its ``aux`` state (``aux.v.1.weight``); empty when clients are the culprit.
        skipping: the algorithm leaves such clients out (``nonfinite="skip"``), and every
            sampled client was one.
    """

    def __init__(
        self,
        round_index: int,
        clients: Mapping[int, Sequence[str]] | None = None,
        server: Sequence[str] = (),
        *,
        skipping: bool = False,
    ) -> None:
        self.round_index = round_index
        self.clients = {cid: tuple(names) for cid, names in (clients or {}).items()}
        self.server = tuple(server)
        self.skipping = skipping
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"round {self.round_index + 1}"
        if self.server:
            in_aux = any(n == "aux" or n.startswith(("aux.", "aux[")) for n in self.server)
            what = "state (model or optimizer) has" if in_aux else "model has"
            return (
                f"{where}: the aggregated server {what} non-finite values (NaN or Inf) in "
                f"{_names(self.server)}; training diverged (lower the learning rate, clip "
                "client updates, or use a robust aggregator)"
            )
        ids = sorted(self.clients)
        first = ids[0]
        if self.skipping:
            return (
                f"{where}: every sampled client ({len(ids)}) sent non-finite values (NaN or "
                f"Inf; client {first}: {_names(self.clients[first])}), so none is left to "
                "aggregate; local training diverged: lower the learning rate or clip updates"
            )
        return (
            f"{where}: client{'s' if len(ids) > 1 else ''} {_id_list(ids)} sent non-finite "
            f"values (NaN or Inf; client {first}: {_names(self.clients[first])}); local "
            "training diverged: lower the learning rate or clip updates, or set "
            "Algorithm.nonfinite='skip' (CLI: --skip-nonfinite) to leave such clients out"
        )


class MissingStage(KeyError):
    """A client looked up a message or stored state that no ``dispatch`` stage provides."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing stage"


class GlobalRNGError(RuntimeError):
    """A client update drew from (or reseeded) torch's global random number generator."""


class OutputLockedError(OSError):
    """Another process or thread is writing the same checkpoint or metrics log."""


class WorkerError(RuntimeError):
    """A worker process died or could not be reached; the pool is closed."""


class PerClientFallback(UserWarning):
    """`Vectorized` met a client update it cannot vectorise and runs it one client at a time."""


class DownloadError(OSError):
    """A download failed: the server could not be reached, answered with an HTTP error, or the
    connection broke. The message is one line naming the URL and the reason; what arrived before
    a broken connection is kept, and the next call resumes it."""


class ChecksumError(ValueError):
    """A download arrived but is not the expected content: another digest, another size, or
    (with ``gunzip``) a broken gzip stream. The message names the URL and what differs; the
    download is discarded."""


class SpillError(OSError):
    """A spill file could not be written or read back whole (one line, naming where)."""
