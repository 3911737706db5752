"""Helpers shared by the runners: reading the case, the per-thread scratch model."""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Sequence

from torch import nn

from .. import models
from ..spec import Case

__all__ = ["ModelCache", "read_case"]


def read_case(argv: Sequence[str] | None = None) -> Case:
    """The case given as the single command-line argument."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m benchmarks.compare.runners.NAME '<case json>'")
    return Case.from_json(args[0])


class ModelCache:
    """One scratch model per thread, built once from a template (no RNG draws after that)."""

    def __init__(self, name: str, classes: int) -> None:
        self._template = models.build(name, classes)
        self._local = threading.local()

    def get(self) -> nn.Module:
        """This thread's scratch model."""
        model: nn.Module | None = getattr(self._local, "model", None)
        if model is None:
            model = copy.deepcopy(self._template)
            self._local.model = model
        return model
