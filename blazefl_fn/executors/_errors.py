"""Errors raised in a worker (a process or a Ray actor), carried back as data and rebuilt.

A failing task is answered with ``("err", index, client_id, round, pickled_cause, summary,
traceback_text)`` (`error_reply`); the caller rebuilds the `ClientError` with the original
exception as its cause and the worker's traceback chained below that (`rebuild_error`).
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ..errors import ClientError

__all__ = ["RemoteTraceback", "error_reply", "rebuild_error"]


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in a worker."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


def _pickled(exc: BaseException) -> bytes | None:
    """``exc`` pickled, or None if it cannot be (the parent then rebuilds it from text)."""
    try:
        return pickle.dumps(exc)
    except Exception:
        return None


def error_reply(index: int, exc: Exception) -> tuple[Any, ...]:
    """The reply for task ``index`` that raised ``exc`` (a `ClientError` names its client)."""
    if isinstance(exc, ClientError):
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        client: int | None = exc.client_id
        round_index: int | None = exc.round_index
    else:
        cause, client, round_index = exc, None, None
    text = "".join(traceback.format_exception(cause))
    summary = f"{type(cause).__name__}: {cause}"
    return ("err", index, client, round_index, _pickled(cause), summary, text)


def _unpickle_cause(data: bytes | None, summary: str) -> BaseException:
    if data is not None:
        # Bytes our own worker made, on our private channel (a pipe or Ray's object store,
        # both of which unpickle every message anyway); a cause whose class cannot be
        # rebuilt falls back to text.
        try:
            cause = pickle.loads(data)
        except Exception:
            cause = None
        if isinstance(cause, BaseException):
            return cause
    return RuntimeError(summary)


def rebuild_error(reply: tuple[Any, ...]) -> BaseException:
    """The exception an `error_reply` describes, with the worker's traceback chained."""
    _, _, client, round_index, data, summary, text = reply
    cause = _unpickle_cause(data, summary)
    cause.__cause__ = RemoteTraceback(text)
    if client is None:
        return cause
    error = ClientError(client, round_index, cause)
    error.__cause__ = cause
    return error
