"""Where the tests find optional real datasets."""

from __future__ import annotations

import os
from pathlib import Path

MNIST_ENV = "BLAZEFL_FN_MNIST_DIR"


def mnist_search_path() -> Path:
    """Where MNIST is looked for: ``$BLAZEFL_FN_MNIST_DIR`` or ``<repo>/../shared/data/mnist``."""
    override = os.environ.get(MNIST_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def mnist_dir() -> Path | None:
    """The real MNIST directory, or None if it is absent."""
    path = mnist_search_path()
    return path if path.is_dir() else None
