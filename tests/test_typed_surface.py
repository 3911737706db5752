"""The typed surface as a user meets it: the installed package is visible to pyright from outside
the repository, strict user code type-checks, misuse of a typed ``aux`` is an error, and the
names a user needs to write an algorithm are at the top level."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import blazefl_fn as fl
from blazefl_fn.run import RunConfig, load_federation, model_factory

ROOT = Path(__file__).resolve().parents[1]
PYRIGHT = Path(sys.executable).parent / "pyright"

MISUSE = """
from __future__ import annotations

import blazefl_fn as fl
from blazefl_fn.algorithms import ScaffoldState
from blazefl_fn.round import RoundFn


def variate_names(state: fl.ServerState[ScaffoldState]) -> list[str]:
    return sorted(state.aux.c)


def wrong(state: fl.ServerState[ScaffoldState]) -> int:
    return state.aux.momentum  # no such field: pyright must say so


def mixed(algo: fl.Algorithm[fl.ClientData, ScaffoldState], other: fl.ServerState[int]) -> None:
    algo.aggregate(other, [])  # a state of another algorithm: pyright must say so


def resumed(round_fn: RoundFn[ScaffoldState], state: fl.ServerState[ScaffoldState]) -> None:
    fl.run_rounds(round_fn, state, fl.Key.from_seed(0), 2)  # the 0.1.0 call: pyright must say so
    fl.run_rounds(round_fn, state, fl.Key.from_seed(0), rounds=2)  # the same, by keyword
    fl.run_rounds(round_fn, state, fl.Key.from_seed(0), until=2)
"""


@pytest.mark.slow
@pytest.mark.skipif(not PYRIGHT.exists(), reason="pyright is installed by the dev extra")
def test_user_code_outside_the_repository_type_checks_against_the_installed_package(
    tmp_path: Path,
) -> None:
    """After the README's install command (``pip install -e . --config-settings
    editable_mode=compat``), pyright strict resolves ``blazefl_fn`` from the interpreter's
    site-packages alone, as it does for a user's project."""
    shutil.copy(ROOT / "examples" / "scaffold_from_stages.py", tmp_path / "user.py")
    (tmp_path / "misuse.py").write_text(textwrap.dedent(MISUSE))
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({"typeCheckingMode": "strict"}))
    done = subprocess.run(
        [str(PYRIGHT), "--outputjson", "--pythonpath", sys.executable, "user.py", "misuse.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    by_file = {Path(d["file"]).name for d in errors}
    assert "user.py" not in by_file, [d["message"] for d in errors if d["file"].endswith("user.py")]
    lines = sorted(
        d["range"]["start"]["line"] + 1 for d in errors if d["file"].endswith("misuse.py")
    )
    source = textwrap.dedent(MISUSE).splitlines()
    flagged = {source[line - 1].strip() for line in lines}
    assert flagged == {
        "return state.aux.momentum  # no such field: pyright must say so",
        "algo.aggregate(other, [])  # a state of another algorithm: pyright must say so",
        "fl.run_rounds(round_fn, state, fl.Key.from_seed(0), 2)  # the 0.1.0 call: pyright must "
        "say so",
        "fl.run_rounds(round_fn, state, fl.Key.from_seed(0), rounds=2)  # the same, by keyword",
    }, [d["message"] for d in errors]


def test_what_a_user_needs_to_write_an_algorithm_is_at_the_top_level() -> None:
    for name in (
        "build_template", "ModelFactory", "algorithms", "client_stages", "client_state",
        "LocalTraining", "LocalResult", "train", "trainable_names", "KeyedDropout",
        "MissingStage", "GlobalRNGError", "scaffold", "feddyn", "fednova", "stochastic",
        "client_store", "ClientStore", "StoreOptions", "StateLayout",
    ):  # fmt: skip
        assert name in fl.__all__, name
        assert hasattr(fl, name), name
    assert fl.algorithms.scaffold is fl.scaffold


def test_rounds_means_the_total_in_both_run_loops() -> None:
    config = RunConfig(clients=4, clients_per_round=2)
    key = fl.Key.from_seed(0)
    data = load_federation(config, key.fold_in("data"))
    algo = fl.fedavg(
        model_factory(config, data), num_clients=4, clients_per_round=2, local=fl.LocalSGD()
    )
    with fl.Sequential() as ex:
        round_fn = fl.make_round(algo, data.clients, ex)
        state, reports = fl.run_rounds(round_fn, algo.init(key), key, until=2)
        again, none = fl.run_rounds(round_fn, state, key, until=2)
        looped = fl.run_loop(round_fn, state, key, 3)
        stepped, one = fl.run_rounds(round_fn, state, key, until=3)
        with pytest.raises(ValueError, match="until=1 is below the state's completed rounds 2"):
            fl.run_rounds(round_fn, state, key, until=1)
    assert (len(reports), len(none), len(one), len(looped.reports)) == (2, 0, 1, 1)
    assert again is state
    assert fl.tree.digest(stepped.params) == fl.tree.digest(looped.state.params)


@pytest.mark.parametrize("call", ["positional", "keyword", "with on_round"])
def test_a_run_rounds_call_written_for_0_1_0_is_refused_naming_the_change(call: str) -> None:
    # Before: run_rounds(round_fn, restored_at_2, key, 2), written for "2 more rounds", ran
    # none and returned as if it had (and N above the restored round ran fewer than N).
    algo = fl.fedavg(
        lambda: torch.nn.Linear(2, 1), num_clients=2, clients_per_round=1, local=fl.LocalSGD()
    )
    state = algo.init(fl.Key.from_seed(0))
    ran: list[int] = []

    def round_fn(s: Any, _key: fl.Key) -> Any:
        ran.append(s.round)
        raise AssertionError("no round may run")

    old: Any = fl.run_rounds
    args: tuple[Any, ...] = (round_fn, state, fl.Key.from_seed(1))
    calls = {
        "positional": lambda: old(*args, 2),
        "keyword": lambda: old(*args, rounds=2),
        "with on_round": lambda: old(*args, 2, print),
    }
    with pytest.raises(TypeError) as caught:
        calls[call]()
    assert str(caught.value) == (
        "run_rounds(..., rounds=2) is the 0.1.0 call, which ran that many more rounds; the "
        "count is now the total to stop at, named until= (CHANGELOG.md): pass until=2 to stop "
        "at round 2, or until=state.round + 2 for 2 more"
    )
    assert ran == []
    with pytest.raises(TypeError, match="run_rounds needs until="):
        old(round_fn, state, fl.Key.from_seed(1))
    with pytest.raises(TypeError, match=r"until must be an int, got 2\.0"):
        old(round_fn, state, fl.Key.from_seed(1), until=2.0)
