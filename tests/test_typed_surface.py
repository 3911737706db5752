"""The typed surface as a user meets it: the installed package is visible to pyright from outside
the repository, strict user code type-checks, misuse of a typed ``aux`` is an error, and the
names a user needs to write an algorithm are at the top level."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

import blazefl_fn as fl
from blazefl_fn.privacy.mechanisms import DPState
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import load_federation, model_factory
from blazefl_fn.server.optim import (
    AdaptiveState,
    ChainState,
    MomentumState,
    adam,
    chain,
    momentum,
    sgd,
)

ROOT = Path(__file__).resolve().parents[1]
PYRIGHT = Path(sys.executable).parent / "pyright"

MISUSE = """
from __future__ import annotations

import torch

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


def model() -> torch.nn.Module:
    return torch.nn.Linear(2, 1)


def plain_and_private(key: fl.Key) -> None:
    algo = fl.fedavg(model, num_clients=4, clients_per_round=2, local=fl.LocalSGD())
    state = algo.init(key)
    print(len(state.aux))  # FedAvg's aux: an empty mapping
    print(state.aux.c)  # a FedAvg state has no aux field c: pyright must say so
    private = fl.privatize(
        algo, fl.CentralDP(clip_norm=1.0, noise_multiplier=1.0), num_clients=4, clients_per_round=2
    )
    noised = private.init(key)
    print(noised.aux.clip_norm, len(noised.aux.server))  # DP's clip norm and FedAvg's aux
    print(noised.aux.clip)  # a typo of clip_norm: pyright must say so
    algo.aggregate(noised, [])  # a private state fed to the plain algorithm: pyright must say so
    local = fl.privatize(algo, fl.LocalDP(1.0, 1.0), num_clients=4, clients_per_round=2)
    print(len(local.init(key).aux))  # local DP keeps the server, and its aux
    restored = fl.load_checkpoint("ck", aux_template=noised.aux).state
    private.aggregate(restored, [])  # a checkpoint loaded for this algorithm


def composed(key: fl.Key) -> None:
    aggregate = fl.Aggregate(server=fl.server.optim.momentum(lr=1.0, beta=0.9))
    algo = fl.compose(
        "my-fedavgm", model, num_clients=4, clients_per_round=2, local=fl.LocalSGD(),
        aggregate=aggregate,
    )
    state = algo.init(key)
    print(sorted(state.aux.velocity))  # FedAvgM's server momentum
    print(state.aux.velocty)  # a typo of velocity: pyright must say so
    restored = fl.load_checkpoint("ck", aux_template=state.aux).state
    print(sorted(restored.aux.velocity))  # a checkpoint loaded for this algorithm
    fl.fedavgm(model, num_clients=4, clients_per_round=2, local=fl.LocalSGD()).aggregate(
        restored, []
    )  # the named FedAvgM takes the composed one's state
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
        # Each was not flagged while fedavg, compose and privatize returned an Any aux.
        "print(state.aux.c)  # a FedAvg state has no aux field c: pyright must say so",
        "print(noised.aux.clip)  # a typo of clip_norm: pyright must say so",
        "algo.aggregate(noised, [])  # a private state fed to the plain algorithm: pyright must "
        "say so",
        "print(state.aux.velocty)  # a typo of velocity: pyright must say so",
    }, [d["message"] for d in errors]


NAMED: dict[str, Any] = {
    "fedavg": {}, "fedprox": {"mu": 0.1}, "fedavgm": {}, "fedadam": {}, "fedyogi": {},
    "fedadagrad": {}, "fedmedian": {}, "trimmed_mean_fedavg": {}, "krum_fedavg": {},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NAMED))
def test_a_named_algorithms_aux_is_what_its_return_type_says(name: str) -> None:
    build = getattr(fl, name)
    declared = typing.get_args(typing.get_type_hints(build)["return"])[1]
    algo = build(
        lambda: torch.nn.Linear(2, 1), num_clients=6, clients_per_round=5, local=fl.LocalSGD(),
        **NAMED[name],
    )  # fmt: skip
    aux = algo.init(fl.Key.from_seed(0)).aux
    assert isinstance(aux, typing.get_origin(declared) or declared), (name, aux, declared)
    private = fl.privatize(algo, fl.LocalDP(1.0, 1.0), num_clients=6, clients_per_round=5)
    assert type(private.init(fl.Key.from_seed(0)).aux) is type(aux)  # local DP: the same aux
    if name in ("fedmedian", "trimmed_mean_fedavg", "krum_fedavg"):
        return  # central DP needs the mean
    central = fl.privatize(algo, fl.CentralDP(1.0, 1.0), num_clients=6, clients_per_round=5)
    wrapped = central.init(fl.Key.from_seed(0)).aux
    assert isinstance(wrapped, DPState)
    assert type(wrapped.server) is type(aux)


def test_composes_aux_is_its_aggregate_stages() -> None:
    def build(aggregate: fl.Aggregate[Any]) -> object:
        algo = fl.compose(
            "x", lambda: torch.nn.Linear(2, 1), num_clients=4, clients_per_round=2,
            local=fl.LocalSGD(), aggregate=aggregate,
        )  # fmt: skip
        return algo.init(fl.Key.from_seed(0)).aux

    assert build(fl.Aggregate()) == {}
    assert isinstance(build(fl.Aggregate(server=momentum(1.0))), MomentumState)
    assert isinstance(build(fl.Aggregate(server=chain(sgd(1.0)))), ChainState)
    dp = fl.CentralDP(1.0, 1.0)
    algo = fl.compose(
        "x", lambda: torch.nn.Linear(2, 1), num_clients=4, clients_per_round=2,
        local=fl.LocalSGD(), aggregate=fl.Aggregate(server=adam(0.1)),
    )  # fmt: skip
    private = (
        fl.privatize(algo, dp, num_clients=4, clients_per_round=2).init(fl.Key.from_seed(0)).aux
    )
    assert isinstance(private, DPState)
    assert isinstance(private.server, AdaptiveState)


def test_a_checkpoint_loads_as_its_templates_type(tmp_path: Path) -> None:
    algo = fl.fedavgm(
        lambda: torch.nn.Linear(2, 1), num_clients=4, clients_per_round=2, local=fl.LocalSGD()
    )
    state = algo.init(fl.Key.from_seed(0))
    fl.save_checkpoint(tmp_path, state, {})
    assert isinstance(fl.load_checkpoint(tmp_path, state.aux).state.aux, MomentumState)
    empty = fl.fedavg(
        lambda: torch.nn.Linear(2, 1), num_clients=4, clients_per_round=2, local=fl.LocalSGD()
    )
    fl.save_checkpoint(tmp_path / "empty", empty.init(fl.Key.from_seed(0)), {})
    assert fl.load_checkpoint(tmp_path / "empty").state.aux == {}


def test_what_a_user_needs_to_write_an_algorithm_is_at_the_top_level() -> None:
    for name in (
        "build_template", "ModelFactory", "algorithms", "client", "server",
        "LocalTraining", "LocalResult", "train", "trainable_names", "KeyedDropout",
        "MissingStage", "GlobalRNGError", "scaffold", "feddyn", "fednova", "errors",
        "ClientStore", "StoreOptions", "StateLayout",
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
