"""The peers' virtual environments under ``benchmarks/.peers/``, created once and reused.

The peers are never dependencies of the project. Every venv that has torch gets
``torch==2.13.0`` (the local CPU wheel) first, and the peer is installed next to the same pin,
so pip never replaces it with a CUDA build:

- ``flower``: ``flwr[simulation]==1.41.0`` (Flower with Ray).
- ``blazefl``: ``blazefl==2.0.3`` with ``--no-deps --ignore-requires-python`` (it declares
  Python >= 3.12 but runs on 3.11) next to numpy and tqdm, its only other imports.
- ``plot``: matplotlib for the chart (no torch).

A venv is ready when its marker file records the same install steps; a failed or changed
install is redone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PEERS", "EnvMissingError", "PeerEnv", "ensure", "python_of"]

TORCH_PIN = "torch==2.13.0"
_MARKER = ".benchmark-ready"


class EnvMissingError(RuntimeError):
    """A peer venv is missing and installing was not allowed."""


@dataclass(frozen=True)
class PeerEnv:
    """How to build one venv: pip install steps in order, then an import check."""

    name: str
    steps: tuple[tuple[str, ...], ...]
    probe: str


PEERS: dict[str, PeerEnv] = {
    "flower": PeerEnv(
        "flower",
        ((TORCH_PIN,), ("flwr[simulation]==1.41.0", TORCH_PIN)),
        "import flwr.simulation, ray, torch; assert torch.__version__.startswith('2.13.0')",
    ),
    "blazefl": PeerEnv(
        "blazefl",
        (
            (TORCH_PIN, "numpy", "tqdm"),
            ("--no-deps", "--ignore-requires-python", "blazefl==2.0.3"),
        ),
        "import blazefl.contrib, torch; assert torch.__version__.startswith('2.13.0')",
    ),
    "plot": PeerEnv("plot", (("matplotlib",),), "import matplotlib"),
}


def python_of(root: Path, name: str) -> Path:
    """The interpreter of venv ``name`` under ``root``."""
    return root / name / "bin" / "python"


def _is_ready(root: Path, env: PeerEnv) -> bool:
    marker = root / env.name / _MARKER
    if not python_of(root, env.name).exists() or not marker.exists():
        return False
    return marker.read_text() == json.dumps(env.steps)


def ensure(root: Path, name: str, *, install: bool, log: Path) -> Path:
    """The interpreter of peer venv ``name``, creating the venv first if needed.

    Raises:
        EnvMissingError: the venv is not ready and ``install`` is false.
        subprocess.CalledProcessError: an install step failed (its output is in ``log``).
    """
    env = PEERS[name]
    if _is_ready(root, env):
        return python_of(root, name)
    if not install:
        raise EnvMissingError(
            f"peer venv {root / name} is missing or incomplete; run without --no-install "
            "to create it"
        )
    print(f"[compare] creating {root / name} (pip output in {log})", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        if not python_of(root, name).exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(root / name)], check=True, stdout=out, stderr=out
            )
        python = str(python_of(root, name))
        for step in env.steps:
            subprocess.run(
                [python, "-m", "pip", "install", "--quiet", *step],
                check=True,
                stdout=out,
                stderr=out,
            )
        subprocess.run([python, "-c", env.probe], check=True, stdout=out, stderr=out)
    (root / name / _MARKER).write_text(json.dumps(env.steps))
    return python_of(root, name)
