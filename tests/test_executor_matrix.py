"""Invariant 1: one params_sha256 per configuration, whatever the executor and worker count."""

from __future__ import annotations

import json
import subprocess
import sys

import attrs
import pytest
from _paths import mnist_dir, mnist_search_path

from blazefl_fn.run import RunConfig, simulate

MATRIX = [("sequential", 1)] + [(e, w) for e in ("threads", "processes") for w in (1, 2, 3)]

pytestmark = pytest.mark.slow


def _digests(base: RunConfig) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    for executor, workers in MATRIX:
        config = attrs.evolve(base, executor=executor, workers=workers)
        out[(executor, workers)] = simulate(config).params_sha256
    return out


def test_synthetic_digest_is_the_same_on_every_executor() -> None:
    digests = _digests(RunConfig(clients=12, clients_per_round=5, rounds=3, batch_size=5))
    assert len(set(digests.values())) == 1, digests


@pytest.mark.skipif(
    mnist_dir() is None,
    reason=f"MNIST not found at {mnist_search_path()}; set BLAZEFL_FN_MNIST_DIR",
)
def test_mnist_digest_is_the_same_on_every_executor() -> None:
    base = RunConfig(
        dataset="mnist", data_dir=str(mnist_dir()), clients=60, clients_per_round=6, rounds=2,
        batch_size=50, lr=0.1,
    )  # fmt: skip
    digests = _digests(base)
    assert len(set(digests.values())) == 1, digests


def test_cli_processes_and_sequential_print_one_digest() -> None:
    def digest(*flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "blazefl_fn", "run", "--json", "--rounds", "2", *flags],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        return str(result["params_sha256"])

    assert digest("--executor", "processes", "--workers", "2") == digest()
