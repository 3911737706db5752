"""Checkpoints written by an earlier layout of the package still resume to the same bits.

Each file under ``tests/data/golden/`` is a real checkpoint, written after 2 of 4 rounds of one
stateful algorithm with portable numerics (so its bits do not depend on the CPU). Resuming it
must give the parameters of the uninterrupted 4-round run, computed here, and the pinned digest.
The files were written before the package moved into role folders (see CHANGELOG.md), so a
module path that leaked into the format (a class name in the aux state, a format constant)
would break them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blazefl_fn.run.config import RunConfig

GOLDEN = Path(__file__).parent / "data" / "golden"
_COMMON = dict(clients=6, clients_per_round=3, batch_size=10, portable=True)
REPO = Path(__file__).resolve().parents[1]
# The distillation algorithms need a public set held out of real images: MNIST, in 600 small
# clients under a logistic regression, so the 4 rounds take a moment. A checkpoint records its
# data directory as given and a resume must name the same one, so the path is the relative one
# the checkpoints were written with, read from the repository's root.
MNIST = "../shared/data/mnist"
_DISTILL = {
    "dataset": "mnist", "data_dir": MNIST, "model": "logreg", "clients": 600,
    "public_size": 200, "public_per_round": 50, "kd_batch_size": 25,
}  # fmt: skip
CASES: dict[str, dict[str, object]] = {
    "fedavg": {"algorithm": "fedavg"},
    "fedadam": {"algorithm": "fedadam"},
    "scaffold": {"algorithm": "scaffold"},
    "feddyn": {"algorithm": "feddyn"},
    "dsfl": {"algorithm": "dsfl", **_DISTILL},
    "scarlet": {"algorithm": "scarlet", **_DISTILL},
    "central-dp": {"algorithm": "fedavg", "dp": "central", "dp_noise_multiplier": 0.5},
}  # fmt: skip
"""Each golden checkpoint's run settings (beside `_COMMON` and the round count)."""
UNINTERRUPTED = {
    "fedavg": "47b2ed7ded2439777b4271db77da3878baa7b215283436fe85ed15e8573fe1f2",
    "fedadam": "8dfe7230ca9bd45fe4f23cb572bfaa4fa000a3584ba994cc238709e21999b413",
    "scaffold": "0afb3cbde14194f05580485ec5856cbc910f31505e5f90425d4845a4801c8348",
    "feddyn": "7a5cdb2e1a164dfab8f9964022a2b16019e79337ce13c001603712131ab2c27e",
    "dsfl": "d4d8fd84442d8159f3e6f02ddb22c00978c0bc937d262890fdfc318d1c6b3b0f",
    "scarlet": "2a5d83c4ff09f173ee7201975a931f7a0bc59254c724b3845546a667bc2f4197",
    "central-dp": "62d89974e06bb55b97f4288713017627fcc1d6be7fbd6a8722a54bc2b564d82a",
}
"""The 4-round runs' parameter digests (portable numerics: the same on any x86-64 CPU)."""


def config_for(name: str, *, rounds: int) -> RunConfig:
    """The run the golden checkpoint ``name`` comes from, ``rounds`` rounds long."""
    return RunConfig(rounds=rounds, **{**_COMMON, **CASES[name]})  # pyright: ignore[reportArgumentType]


def _resume_all(scratch: Path) -> dict[str, tuple[str, str]]:
    """Per case: the resumed and the uninterrupted digest, in a fresh process (portable
    numerics must be on before torch runs its first kernel)."""
    for name in CASES:
        (scratch / name).mkdir()
        (scratch / name / "checkpoint.pt").write_bytes((GOLDEN / f"{name}.pt").read_bytes())
    script = (
        "import json, sys\n"
        "from test_golden_checkpoints import CASES, MNIST, config_for\n"
        "from pathlib import Path\n"
        "from blazefl_fn.run.simulate import simulate\n"
        "out = {}\n"
        "for name in CASES:\n"
        "    if CASES[name].get('dataset') == 'mnist' and not Path(MNIST).is_dir():\n"
        "        continue\n"
        "    config = config_for(name, rounds=4)\n"
        "    resumed = simulate(config, resume=Path(sys.argv[1]) / name).params_sha256\n"
        "    out[name] = (resumed, simulate(config).params_sha256)\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(scratch)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, tuple[str, str]] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return _resume_all(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_golden_checkpoint_resumes_to_the_uninterrupted_bits(
    name: str, resumed: dict[str, tuple[str, str]]
) -> None:
    if name not in resumed:
        pytest.skip(f"MNIST not found at {REPO / MNIST}")
    digest, uninterrupted = resumed[name]
    assert digest == uninterrupted
    assert digest == UNINTERRUPTED[name]
