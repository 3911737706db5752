"""DS-FL and SCARLET: cache synchronisation, communication accounting, persistence, determinism."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import torch
from _paths import mnist_dir, mnist_search_path
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.algorithms import _distill
from blazefl_fn.algorithms.dsfl import DSFLState, dsfl
from blazefl_fn.algorithms.label_cache import CacheSignal
from blazefl_fn.algorithms.scarlet import ScarletState, client_cache, known_versions, scarlet
from blazefl_fn.cli._commands import main
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.errors import ClientError
from blazefl_fn.executors import Processes, Sequential, Threads
from blazefl_fn.executors.base import Executor
from blazefl_fn.keys import Key
from blazefl_fn.models import intra_op_threads, mlp
from blazefl_fn.records import RoundReport, ServerState
from blazefl_fn.round import Algorithm, make_round, run_round
from blazefl_fn.run.checkpoint import load_checkpoint, save_checkpoint
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import run_rounds
from blazefl_fn.tree import Params, digest, trees_equal

T = TypeVar("T")
R = TypeVar("R")

# -- a tiny federation: 6 clients of 40 examples with 8 features and 3 classes, 40 public inputs

NUM_CLIENTS = 6
CLASSES = 3
PUBLIC_SIZE = 40
_gen = torch.Generator().manual_seed(0)
_x = torch.randn(NUM_CLIENTS * 40, 8, generator=_gen)
_y = (_x[:, 0] > 0).long() + (_x[:, 1] > 0).long()
CLIENTS = tuple(
    ClientData(TensorDataset(_x, _y), torch.arange(i * 40, (i + 1) * 40))
    for i in range(NUM_CLIENTS)
)
PUBLIC = torch.randn(PUBLIC_SIZE, 8, generator=_gen)
MODEL = functools.partial(mlp, (8,), CLASSES, hidden=(32,))
LOCAL = LocalSGD(batch_size=10, lr=0.1)
RUN_KEY = Key.from_seed(0)
INIT_KEY = RUN_KEY.fold_in("init")


def _scarlet(**kwargs: Any) -> Algorithm[ClientData]:
    options: dict[str, Any] = {
        "clients_per_round": 3,
        "public_per_round": 15,
        "cache_duration": 3,
        **kwargs,
    }
    return scarlet(
        MODEL, public=PUBLIC, num_classes=CLASSES, num_clients=NUM_CLIENTS, local=LOCAL, **options
    )


def _dsfl(**kwargs: Any) -> Algorithm[ClientData]:
    options: dict[str, Any] = {"clients_per_round": 3, "public_per_round": 15, **kwargs}
    return dsfl(
        MODEL, public=PUBLIC, num_classes=CLASSES, num_clients=NUM_CLIENTS, local=LOCAL, **options
    )


def _with_schedule(algo: Algorithm[ClientData], schedule: Sequence[Sequence[int]]) -> Any:
    """``algo`` whose round ``t`` takes part with the clients ``schedule[t]``."""

    def sample(state: ServerState, _key: Key) -> tuple[int, ...]:
        return tuple(schedule[state.round])

    return attrs.evolve(algo, sample=sample)


def _round_key(state: ServerState) -> Key:
    return RUN_KEY.fold_in(state.round)


def _scarlet_aux(state: ServerState) -> ScarletState:
    assert isinstance(state.aux, ScarletState)
    return state.aux


def _dsfl_aux(state: ServerState) -> DSFLState:
    assert isinstance(state.aux, DSFLState)
    return state.aux


def _nbytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def _whole_state(state: ServerState) -> dict[str, torch.Tensor]:
    """Every tensor of a DS-FL or SCARLET server state, under distinct names."""
    aux = state.aux
    assert isinstance(aux, DSFLState | ScarletState)
    out = {f"params.{n}": t for n, t in state.params.items()}
    out["round"] = torch.tensor(state.round)
    out["has_targets"] = torch.tensor(aux.has_targets)
    out["server_key"] = aux.server_key
    out["target_indices"] = aux.target_indices
    if isinstance(aux, ScarletState):
        out.update(
            {
                "cache.labels": aux.cache.labels,
                "cache.produced": aux.cache.produced,
                "signals": aux.signals,
            }
        )
        for k, record in aux.known.items():
            out.update({f"known{k}.{n}": t for n, t in record.items()})
    else:
        out["targets"] = aux.targets
    out["clients_key"] = aux.clients_key
    for k, stored in aux.clients.items():
        out.update({f"client{k}.{n}": t for n, t in stored.items()})
    return out


class Recording:
    """An executor that runs tasks in order and keeps every task and result it saw."""

    def __init__(self) -> None:
        self.tasks: list[Any] = []
        self.results: list[Any] = []

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        results = [fn(t) for t in tasks]
        self.tasks = list(tasks)
        self.results = list(results)
        return results

    def close(self) -> None:
        pass

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *_: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _one_thread() -> Generator[None]:
    # Worker processes use one intra-op thread; so does this process, for bitwise equality.
    with intra_op_threads(1):
        yield


# -- 1. SCARLET: every participant's cache is what the server records it holds ------------------


@settings(max_examples=20, deadline=None)
@given(
    duration=st.integers(0, 4),
    per_round=st.sampled_from([15, 15, 1, PUBLIC_SIZE]),
    schedule=st.lists(
        st.frozensets(st.integers(0, NUM_CLIENTS - 1), min_size=1), min_size=5, max_size=5
    ),
)
def test_scarlet_client_caches_match_the_servers_record(
    duration: int, per_round: int, schedule: list[frozenset[int]]
) -> None:
    algo = _scarlet(cache_duration=duration, public_per_round=per_round)
    algo = _with_schedule(algo, [sorted(s) for s in schedule])
    state = algo.init(INIT_KEY)
    with Sequential() as executor:
        for participants in schedule:
            before = _scarlet_aux(state)
            state, report = run_round(algo, CLIENTS, executor, state, _round_key(state))
            aux = _scarlet_aux(state)
            assert report.clients == tuple(sorted(participants))
            for k in range(NUM_CLIENTS):
                stored = aux.clients[k]
                known = known_versions(aux, k)
                if k not in participants:
                    # Untouched: the same state and the same record.
                    assert trees_equal(stored, before.clients[k])
                    assert torch.equal(known, known_versions(before, k))
                    continue
                cache = client_cache(stored, PUBLIC_SIZE)
                assert torch.equal(cache.produced, known)
                # Only the entries it holds are stored, and so recorded.
                assert torch.equal(stored["cache.indices"], torch.nonzero(known >= 0).flatten())
                assert torch.equal(aux.known[k]["indices"], stored["cache.indices"])
                same = (known == aux.cache.produced) & (aux.cache.produced >= 0)
                assert torch.equal(cache.labels[same], aux.cache.labels[same])
                # What it distilled on this round (last round's targets) is the server's.
                targets = before.target_indices if before.has_targets else before.target_indices[:0]
                assert torch.equal(cache.produced[targets], before.cache.produced[targets])
                assert torch.equal(cache.labels[targets], before.cache.labels[targets])


# -- 2. communication accounting -----------------------------------------------------------------


def _check_accounting(algo: Algorithm[ClientData], rounds: int) -> list[RoundReport]:
    """Run ``rounds`` rounds, checking each report's bytes against the packages themselves."""
    state = algo.init(INIT_KEY)
    recording = Recording()
    reports: list[RoundReport] = []
    for _ in range(rounds):
        downlink = algo.broadcast(state)
        previous = state
        state, report = run_round(algo, CLIENTS, recording, state, _round_key(state))
        ids = report.clients
        assert algo.dispatch is not None
        inputs = algo.dispatch(previous, ids)
        assert [t.client_id for t in recording.tasks] == list(ids)
        for given_input, task in zip(inputs, recording.tasks, strict=True):
            assert given_input.message.keys() == task.message.keys()
            assert all(torch.equal(given_input.message[n], task.message[n]) for n in task.message)
        down = _nbytes(downlink.params) * len(ids) + sum(_nbytes(i.message) for i in inputs)
        up = sum(_nbytes(u.params) for u in recording.results)
        assert (report.bytes_down, report.bytes_up) == (down, up)
        # The stored state handed over is not communication: it is in no byte count.
        assert all(_nbytes(i.state) > 0 for i in inputs)
        reports.append(report)
    return reports


@pytest.mark.parametrize("factory", [_scarlet, _dsfl], ids=["scarlet", "dsfl"])
def test_report_bytes_are_the_packages_bytes(factory: Callable[..., Any]) -> None:
    reports = _check_accounting(factory(), rounds=4)
    assert all(r.bytes_down > 0 for r in reports)


def test_dsfl_uploads_public_per_round_soft_labels_per_client() -> None:
    reports = _check_accounting(_dsfl(public_per_round=12, clients_per_round=4), rounds=3)
    for report in reports:
        assert report.bytes_up == 4 * 12 * CLASSES * 4  # float32 per client
    # Round 0 sends only the request; later rounds also the last round's targets.
    assert reports[0].bytes_down == 4 * 12 * 8
    assert reports[1].bytes_down == 4 * (12 * 8 + 12 * 8 + 12 * CLASSES * 4)


@pytest.mark.parametrize("duration", [2, 3, 10])
def test_scarlet_full_participation_syncs_exactly_last_rounds_new_labels(duration: int) -> None:
    algo = _scarlet(clients_per_round=NUM_CLIENTS, cache_duration=duration)
    everyone = tuple(range(NUM_CLIENTS))
    state = algo.init(INIT_KEY)
    cached_seen = False
    with Sequential() as executor:
        for _ in range(6):
            request = algo.broadcast(state).params["request"]
            produced_in = state.round
            state, _ = run_round(algo, CLIENTS, executor, state, _round_key(state))
            aux = _scarlet_aux(state)
            fresh = aux.signals == int(CacheSignal.CACHED)
            cached_seen |= bool(fresh.any())
            new = aux.target_indices[~fresh]
            # What round ``produced_in`` requested is what it labelled anew.
            assert torch.equal(new, request)
            assert algo.dispatch is not None
            for given_input in algo.dispatch(state, everyone):
                message = given_input.message
                assert torch.equal(message["sync_indices"], new)
                assert torch.equal(message["sync_labels"], aux.cache.labels[new])
                assert bool((message["sync_produced"] == produced_in).all())
    assert cached_seen, "no cached label in 6 rounds: the test checks nothing"


@pytest.mark.parametrize("duration", [0, 1, 2, 4, 100])
def test_scarlet_requests_what_is_not_fresh(duration: int) -> None:
    algo = _scarlet(cache_duration=duration, public_per_round=15)
    produced: dict[int, int] = {}  # this test's own record of the server's cache
    sizes: list[int] = []
    state = algo.init(INIT_KEY)
    with Sequential() as executor:
        for _ in range(8):
            now = state.round
            request = algo.broadcast(state).params["request"].tolist()
            state, report = run_round(algo, CLIENTS, executor, state, _round_key(state))
            chosen = _scarlet_aux(state).target_indices.tolist()
            stale = [i for i in chosen if not (i in produced and now - produced[i] < duration)]
            assert request == stale
            assert report.bytes_up == len(report.clients) * len(stale) * CLASSES * 4
            produced.update(dict.fromkeys(request, now))
            sizes.append(len(request))
    if duration <= 1:
        assert sizes == [15] * 8
    else:
        assert sizes[0] == 15
        assert sum(sizes) < 15 * 8


def test_scarlet_whole_public_set_each_round_requests_on_expiry_only() -> None:
    algo = _scarlet(public_per_round=PUBLIC_SIZE, cache_duration=2)
    with Sequential() as executor:
        state, reports = run_rounds(
            make_round(algo, CLIENTS, executor), algo.init(INIT_KEY), RUN_KEY, until=5
        )
    full = 3 * PUBLIC_SIZE * CLASSES * 4
    assert [r.bytes_up for r in reports] == [full, 0, full, 0, full]
    aux = _scarlet_aux(state)
    assert bool((aux.signals == int(CacheSignal.EXPIRED)).all())  # round 4's: all re-requested
    assert bool((aux.cache.produced == 4).all())


# -- 3. a drifted cache fails loudly -------------------------------------------------------------


def _whole_set_state(rounds: int) -> tuple[Algorithm[ClientData], ServerState]:
    """SCARLET over the whole public set each round, everyone taking part, after ``rounds``.

    Round 0 labels every index; from round 1 on every target is CACHED (until round 3).
    """
    algo = _scarlet(clients_per_round=NUM_CLIENTS, public_per_round=PUBLIC_SIZE, cache_duration=3)
    with Sequential() as executor:
        state, _ = run_rounds(
            make_round(algo, CLIENTS, executor), algo.init(INIT_KEY), RUN_KEY, until=rounds
        )
    return algo, state


@pytest.mark.parametrize("wrong", [-1, 1, 2, 7])
def test_a_tampered_client_cache_is_out_of_sync(wrong: int) -> None:
    algo, state = _whole_set_state(2)
    aux = _scarlet_aux(state)
    assert bool((aux.signals == int(CacheSignal.CACHED)).all())
    assert all(bool((known_versions(aux, k) == 0).all()) for k in range(NUM_CLIENTS))
    target = 7
    stored = aux.clients[2]
    assert torch.equal(stored["cache.indices"], torch.arange(PUBLIC_SIZE))
    produced = stored["cache.produced"].clone()
    produced[target] = wrong
    stored["cache.produced"] = produced
    clients = aux.clients.updated({2: stored})
    tampered = attrs.evolve(state, aux=attrs.evolve(aux, clients=clients))
    with Sequential() as executor:
        run_round(algo, CLIENTS, executor, state, _round_key(state))  # untampered: fine
        with pytest.raises(ClientError, match="out of sync") as info:
            run_round(algo, CLIENTS, executor, tampered, _round_key(state))
    assert info.value.client_id == 2
    assert info.value.round_index == 2
    assert f"public index {target}" in str(info.value)


def test_a_wrong_server_record_is_out_of_sync() -> None:
    # The server believes client 4 already holds round 0's labels, so it sends none of them.
    algo, state = _whole_set_state(1)
    aux = _scarlet_aux(state)
    assert bool((aux.signals == int(CacheSignal.NEW)).all())
    assert bool((aux.cache.produced == 0).all())
    known = aux.known.updated(
        {4: {"indices": torch.arange(PUBLIC_SIZE), "produced": aux.cache.produced}}
    )
    tampered = attrs.evolve(state, aux=attrs.evolve(aux, known=known))
    with Sequential() as executor, pytest.raises(ClientError, match="out of sync") as info:
        run_round(algo, CLIENTS, executor, tampered, _round_key(state))
    assert info.value.client_id == 4
    assert "signal NEW" in str(info.value)


# -- 4. client models persist between rounds -----------------------------------------------------


def _model(stored: Params) -> dict[str, torch.Tensor]:
    return {n: t for n, t in stored.items() if n.startswith("model.")}


def _clients(state: ServerState) -> Any:
    aux = state.aux
    assert isinstance(aux, DSFLState | ScarletState)
    return aux.clients


@pytest.mark.parametrize("factory", [_scarlet, _dsfl], ids=["scarlet", "dsfl"])
def test_client_models_persist_between_rounds(factory: Callable[..., Any]) -> None:
    algo = _with_schedule(factory(), [[0, 1], [2, 3], [0, 2]])
    recording = Recording()
    initial = algo.init(INIT_KEY)
    first, _ = run_round(algo, CLIENTS, recording, initial, RUN_KEY.fold_in(0))
    returned = {u.client_id: u.state for u in recording.results}
    recording_first = list(recording.tasks)
    for k in range(NUM_CLIENTS):
        now, then = _clients(first)[k], _clients(initial)[k]
        # Nobody holds state before taking part.
        assert then == {}
        if k in (0, 1):
            assert trees_equal(now, returned[k])
        else:
            assert now == {}
    second, _ = run_round(algo, CLIENTS, recording, first, RUN_KEY.fold_in(1))
    assert trees_equal(_clients(second)[0], _clients(first)[0])
    third, _ = run_round(algo, CLIENTS, recording, second, RUN_KEY.fold_in(2))
    # Client 0 starts round 2 from the model it kept after round 0 ...
    task0, task2 = recording.tasks
    assert task0.client_id == 0
    assert trees_equal(task0.state, _clients(first)[0])
    assert trees_equal(task2.state, _clients(second)[2])  # kept from round 1
    # A client's first model comes from its own key.
    first_model = _distill.first_model(MODEL, initial.aux.clients_key, 0)
    first_task = recording_first[0]
    assert trees_equal(_model(first_task.state), first_model)
    assert digest(_model(returned[0])) != digest(first_model)
    # ... and that start matters: from its initial model it would end elsewhere.
    downlink = algo.broadcast(second)
    redo = algo.client_update(downlink, CLIENTS[0], task0)
    assert digest(redo.state) == digest(_clients(third)[0])
    fresh_start = attrs.evolve(task0, state={**task0.state, **first_model})
    other = algo.client_update(downlink, CLIENTS[0], fresh_start)
    assert digest(_model(other.state)) != digest(_model(redo.state))


# -- 5. every executor computes the same bits ----------------------------------------------------


@pytest.fixture(scope="module")
def processes() -> Generator[Processes]:
    with intra_op_threads(1), Processes(2) as pool:
        yield pool


def _run_on(
    algo: Algorithm[ClientData], executor: Executor, rounds: int
) -> tuple[dict[str, str], list[tuple[tuple[int, ...], int, int, int]]]:
    state, reports = run_rounds(
        make_round(algo, CLIENTS, executor), algo.init(INIT_KEY), RUN_KEY, until=rounds
    )
    digests = {n: digest({n: t}) for n, t in _whole_state(state).items()}
    digests["params"] = digest(state.params)
    return digests, [(r.clients, r.bytes_down, r.bytes_up, r.num_examples) for r in reports]


@pytest.mark.parametrize("factory", [_scarlet, _dsfl], ids=["scarlet", "dsfl"])
def test_every_executor_gives_one_digest(factory: Callable[..., Any], processes: Processes) -> None:
    algo = factory(clients_per_round=3)
    with Sequential() as sequential, Threads(2) as threads:
        results = {
            "sequential": _run_on(algo, sequential, 4),
            "threads": _run_on(algo, threads, 4),
            "processes": _run_on(algo, processes, 4),
        }
    reference = results["sequential"]
    for name, result in results.items():
        assert result[0] == reference[0], name
        assert result[1] == reference[1], name
    # Partial participation, and not always the same clients.
    assert len({r[0] for r in reference[1]}) > 1


@pytest.mark.parametrize("factory", [_scarlet, _dsfl], ids=["scarlet", "dsfl"])
def test_device_lists_give_the_same_digest_and_client_states(factory: Callable[..., Any]) -> None:
    algo = factory(clients_per_round=4)
    with intra_op_threads(1), Sequential() as sequential:
        reference = _run_on(algo, sequential, 3)
    spread = [
        lambda: Sequential(devices=["cpu", "cpu"]),
        lambda: Threads(2, devices=["cpu"] * 3),
        lambda: Processes(2, devices=["cpu"] * 3),
    ]
    for make in spread:
        with intra_op_threads(1), make() as executor:
            assert _run_on(algo, executor, 3) == reference, repr(executor)


# -- 6. checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [_scarlet, _dsfl], ids=["scarlet", "dsfl"])
def test_checkpoint_round_trip_continues_bitwise(
    factory: Callable[..., Any], tmp_path: Path
) -> None:
    algo = factory()
    with Sequential() as executor:
        round_fn = make_round(algo, CLIENTS, executor)
        whole, whole_reports = run_rounds(round_fn, algo.init(INIT_KEY), RUN_KEY, until=4)
        half, _ = run_rounds(round_fn, algo.init(INIT_KEY), RUN_KEY, until=2)
        save_checkpoint(tmp_path, half, {"algorithm": algo.name})
        loaded = load_checkpoint(tmp_path, aux_template=algo.init(Key.from_seed(99)).aux).state
        assert loaded.round == 2
        assert digest(_whole_state(loaded)) == digest(_whole_state(half))
        rest, rest_reports = run_rounds(round_fn, loaded, RUN_KEY, until=4)  # up to 4 in all
    assert digest(_whole_state(rest)) == digest(_whole_state(whole))
    assert [(r.bytes_down, r.bytes_up, r.clients) for r in rest_reports] == [
        (r.bytes_down, r.bytes_up, r.clients) for r in whole_reports[2:]
    ]


# -- 7. configuration and command-line errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "dsfl"}, "dsfl distills on a public set"),
        ({"algorithm": "scarlet"}, "scarlet distills on a public set"),
        (
            {"algorithm": "scarlet", "dataset": "mnist", "data_dir": "x", "public_size": 100,
             "public_per_round": 101},
            r"public_per_round \(101\) exceeds public_size \(100\)",
        ),
        ({"cache_duration": -1}, r"cache_duration must be an integer in \[0, 10000000\], got \-1"),
        ({"era_exponent": 0.0}, r"era_exponent must be a finite number in \(0, 1000\], got 0\.0"),
        (
            {"era_temperature": 0.0},
            r"era_temperature must be a finite number in \(0, 1e\+06\], got 0\.0",
        ),
        ({"public_size": 0}, r"public_size must be an integer in \[1, 10000000\], got 0"),
        ({"public_per_round": 0}, r"public_per_round must be an integer in \[1, 10000000\], got 0"),
    ],
)  # fmt: skip
def test_bad_distillation_configs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _scarlet(cache_duration=-1), "cache_duration must be an integer >= 0, got -1"),
        (lambda: _scarlet(exponent=0), "exponent must be a finite number > 0, got 0"),
        (lambda: _scarlet(exponent=float("nan")), "exponent must be a finite number > 0, got nan"),
        (lambda: _dsfl(temperature=0), "temperature must be a finite number > 0, got 0"),
        (lambda: _dsfl(temperature=-1.5), "temperature must be a finite number > 0, got -1.5"),
        (lambda: _dsfl(public_per_round=41), r"public_per_round must be in \[1, 40\].*got 41"),
        (lambda: _scarlet(public_per_round=0), r"public_per_round must be in \[1, 40\].*got 0"),
        (lambda: _scarlet(clients_per_round=7), r"clients_per_round must be in \[1, num_clients"),
    ],
)
def test_bad_algorithm_arguments_are_refused(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_empty_public_set_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty batch of inputs"):
        dsfl(MODEL, public=torch.empty(0, 8), num_classes=CLASSES, num_clients=NUM_CLIENTS,
             clients_per_round=2, local=LOCAL)  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "scarlet"], "scarlet distills on a public set"),
        (["--algorithm", "dsfl"], "dsfl distills on a public set"),
        (["--cache-duration", "-1"], "cache_duration must be an integer in [0, 10000000], got -1"),
        (["--era-exponent", "0"], "era_exponent must be a finite number in (0, 1000], got 0.0"),
        (
            ["--algorithm", "dsfl", "--dataset", "mnist", "--data-dir", "x",
             "--public-size", "10", "--public-per-round", "20"],
            "public_per_round (20) exceeds public_size (10)",
        ),
    ],
)  # fmt: skip
def test_cli_distillation_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("blazefl-fn: error: ")
    assert message in lines[0]


def test_cli_scarlet_on_synthetic_exits_2_without_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blazefl_fn", "run", "--algorithm", "scarlet"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("blazefl-fn: error: scarlet distills on a public set")


# -- 8. end to end on MNIST ----------------------------------------------------------------------

MNIST = mnist_dir()
MNIST_FLAGS = [
    "--dataset", "mnist", "--data-dir", str(MNIST), "--algorithm", "scarlet",
    "--partition", "dirichlet", "--alpha", "0.3", "--clients", "6",
    "--clients-per-round", "3", "--public-size", "300", "--public-per-round", "100",
    "--batch-size", "50", "--json", "--quiet",
]  # fmt: skip
needs_mnist = pytest.mark.skipif(
    MNIST is None, reason=f"MNIST not found at {mnist_search_path()}; set BLAZEFL_FN_MNIST_DIR"
)


def _cli_json(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "blazefl_fn", "run", *MNIST_FLAGS, *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def mnist_runs() -> dict[str, dict[str, Any]]:
    """Two rounds of SCARLET on MNIST through the CLI, on every executor."""
    return {
        executor: _cli_json("--rounds", "2", "--executor", executor)
        for executor in ("sequential", "threads", "processes")
    }


@pytest.mark.slow
@needs_mnist
def test_scarlet_cli_on_mnist_gives_one_digest_on_every_executor(
    mnist_runs: dict[str, dict[str, Any]],
) -> None:
    reference = mnist_runs["sequential"]
    for name, result in mnist_runs.items():
        assert result["algorithm"] == "scarlet"
        assert result["rounds"] == 2
        assert result["executor"] == name
        for field in ("params_sha256", "bytes_up", "bytes_down"):
            assert result[field] == reference[field], (name, field)
    for field in ("bytes_up", "bytes_down"):
        assert isinstance(reference[field], int)
        assert reference[field] > 0
    # Round 0 requests all 100 labels from each of 3 clients (10 float32 classes); round 1 at
    # most as many.
    one_round = 3 * 100 * 10 * 4
    assert one_round <= reference["bytes_up"] <= 2 * one_round


@pytest.mark.slow
@needs_mnist
def test_scarlet_cli_on_mnist_resumes_to_the_same_bits(
    mnist_runs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    checkpoints = str(tmp_path / "ck")
    first = _cli_json("--rounds", "1", "--checkpoint-dir", checkpoints)
    assert first["rounds"] == 1
    # The caches, the server's records and every client model come back from the checkpoint.
    resumed = _cli_json("--rounds", "2", "--resume", checkpoints, "--executor", "threads")
    assert resumed["rounds"] == 2
    assert resumed["params_sha256"] == mnist_runs["sequential"]["params_sha256"]
