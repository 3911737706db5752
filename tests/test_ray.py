"""The Ray executor on a real local Ray instance (loopback only): bits, faults, cleanup, CLI."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import _executor_helpers as helpers
import pytest
import torch
from _ray_helpers import HEAD_IP, ray_env, ray_pids, strays, wait_until_gone

from benchmarks.gpu_check import tiny_federation
from blazefl_fn import tree
from blazefl_fn.errors import ClientError, WorkerError
from blazefl_fn.executors import Ray, Sequential
from blazefl_fn.executors.jobs import ClientContext, ClientJob
from blazefl_fn.keys import Key
from blazefl_fn.models import intra_op_threads
from blazefl_fn.records import ClientTask, Downlink
from blazefl_fn.round import make_round
from blazefl_fn.run.config import ALGORITHMS, PERSONAL, STATEFUL, RunConfig
from blazefl_fn.run.simulate import load_federation, make_algorithm, run_rounds
from blazefl_fn.run.simulate import model_factory as factory_for
from blazefl_fn.server.client_state import ClientStore

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[ray]'")

__all__ = ["ray_env"]  # a fixture, used by name

CPUS = 4

# Ray's processes are counted machine-wide (`ray_pids`): tests that start Ray run one at a time,
# on one worker of a parallel run (`make test`'s `--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("ray")


def test_the_ray_tests_share_one_worker(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` (``make test``) a test marked ``xdist_group("ray")`` carries
    its group in its id: that is how pytest-xdist sends every such test to one worker. Without
    it two workers start Ray at once, and each counts the other's processes as its own."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not a --dist loadgroup run")
    assert request.node.nodeid.endswith("@ray"), (
        f"{request.node.nodeid}: pytest-xdist did not group the Ray tests (pytest "
        f"{pytest.__version__}; pyproject.toml pins the versions that do)"
    )


@pytest.fixture(scope="module")
def session(ray_env: None) -> Iterator[None]:
    """One local Ray instance for the module; executors join it and leave it running."""
    del ray_env
    ray.init(num_cpus=CPUS, include_dashboard=False, _node_ip_address=HEAD_IP,
             logging_level="ERROR")  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(session: None) -> Iterator[Ray]:
    del session
    with intra_op_threads(1), Ray(workers=2) as executor:
        yield executor


def _digest(algorithm: Any, clients: Any, executor: Any, rounds: int = 2) -> tuple[str, str | None]:
    """The final parameters' digest and, for an algorithm with client state, its store's."""
    key = Key.from_seed(0)
    with intra_op_threads(1):
        state, _ = run_rounds(
            make_round(algorithm, clients, executor), algorithm.init(key.fold_in("init")), key,
            until=rounds,
        )  # fmt: skip
    store = getattr(state.aux, "clients", None)
    return tree.digest(state.params), store.digest() if isinstance(store, ClientStore) else None


def test_results_come_back_in_task_order_and_the_session_is_kept(pool: Ray) -> None:
    assert pool.map(helpers.finish_in_reverse, [0, 1, 2, 3, 4]) == [0, 1, 2, 3, 4]
    assert pool.map(helpers.square, []) == []
    assert len(set(pool.pids)) == 2


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_gives_the_sequential_bits(algorithm: str, pool: Ray) -> None:
    if algorithm in ("dsfl", "scarlet"):
        federation = tiny_federation()
        data, model_fn = federation.data, federation.model_fn
        config = RunConfig(
            algorithm=algorithm, dataset="mnist", data_dir="-", clients=8, clients_per_round=5,
            batch_size=8, lr=0.05, public_size=40, public_per_round=12,
        )  # fmt: skip
    else:
        # The personalised algorithms split a model into body and head: not logistic regression.
        model = "mlp" if algorithm in PERSONAL else "auto"
        config = RunConfig(
            algorithm=algorithm, clients=8, clients_per_round=6, batch_size=5, model=model
        )
        data = load_federation(config, Key.from_seed(0).fold_in("data"))
        model_fn = factory_for(config, data)
    algo = make_algorithm(config, model_fn, len(data.clients), data)
    with Sequential() as sequential:
        expected = _digest(algo, data.clients, sequential)
    assert (expected[1] is not None) == (algorithm in STATEFUL)
    assert _digest(algo, data.clients, pool) == expected


@pytest.mark.parametrize("workers", [1, 3])
def test_any_number_of_actors_gives_the_same_bits(workers: int, session: None) -> None:
    del session
    config = RunConfig(clients=8, clients_per_round=6, batch_size=5)
    data = load_federation(config, Key.from_seed(0).fold_in("data"))
    algo = make_algorithm(config, factory_for(config, data), 8, data)
    with Sequential() as sequential:
        expected = _digest(algo, data.clients, sequential)
    with Ray(workers=workers, num_cpus_per_worker=0.5, devices=["cpu", "cpu"]) as executor:
        assert _digest(algo, data.clients, executor) == expected
        assert executor.context_sends == 1  # once per context, not per round
    assert ray.is_initialized()  # joined, so left running


def _job(update: Any) -> ClientJob[float]:
    downlink = Downlink(round=3, params={"w": torch.zeros(4)})
    return ClientJob(ClientContext(update, [0.5 * i for i in range(6)]), downlink)


def test_a_client_error_names_client_and_round_with_the_actors_traceback(pool: Ray) -> None:
    tasks = [ClientTask(k, 3, Key.from_seed(k)) for k in range(6)]
    with pytest.raises(ClientError, match="client 1 failed in round 4") as info:
        pool.map(_job(helpers.fail_for_odd_clients), tasks)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert "fail_for_odd_clients" in str(cause.__cause__)  # the remote traceback
    # The pool stays usable.
    assert len(pool.map(_job(helpers.pid_update), tasks)) == 6


def test_an_actor_killed_mid_round_is_a_worker_error_within_10_s(session: None) -> None:
    del session
    executor = Ray(workers=2)
    tasks = [ClientTask(k, 7, Key.from_seed(k)) for k in range(4)]
    victim = executor.pids[1]
    threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        executor.map(_job(helpers.sleep_forever_update), tasks)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert f"pid {victim}" in message
    assert "in round 8" in message
    assert "client 1 in round 8" in message or "client 3 in round 8" in message
    with pytest.raises(RuntimeError, match="closed"):
        executor.map(helpers.square, [1])


def test_a_stopped_actor_becomes_a_worker_error_within_the_client_timeout(
    session: None,
) -> None:
    # Before: Ray had no client_timeout; an actor stopped with SIGSTOP hung the round forever.
    del session
    executor = Ray(workers=2, client_timeout=1.0)
    try:
        pids = list(executor.pids)
        start = time.monotonic()
        with pytest.raises(
            WorkerError, match=r"gave no result for task 2 within client_timeout=1 s"
        ):
            executor.map(helpers.stop_self_on, [0, 1, 2, 3, 4, 5])
        assert time.monotonic() - start < 10
        assert wait_until_gone(set(pids)) == set()  # killed, the stopped one included
        with pytest.raises(RuntimeError, match="closed"):
            executor.map(helpers.square, [1])
    finally:
        executor.close()


def test_the_client_timeout_names_the_client_and_round(session: None) -> None:
    del session
    with Ray(workers=1, client_timeout=1.0) as executor:
        tasks = [ClientTask(k, 4, Key.from_seed(k)) for k in range(2)]
        with pytest.raises(WorkerError, match=r"no result for client 0 in round 5 within"):
            executor.map(_job(helpers.sleep_forever_update), tasks)


def test_the_client_timeout_does_not_fire_on_slow_but_progressing_work(session: None) -> None:
    del session
    with Ray(workers=1, client_timeout=1.0) as executor:
        # Each task takes 0.2 s; the whole map (1.6 s) takes longer than the timeout.
        assert len(set(executor.map(helpers.pid, list(range(8))))) == 1


def test_actors_that_cannot_be_placed_are_refused_with_the_resources(session: None) -> None:
    del session
    with pytest.raises(WorkerError, match=r"did not start within 2\.0 s.*cluster has"):
        Ray(workers=CPUS + 1, start_timeout=2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"num_cpus_per_worker": -1}, "num_cpus_per_worker must be a number >= 0"),
        ({"devices": ["tpu"]}, "malformed device 'tpu'"),
        ({"devices": "cpu"}, "non-empty sequence of devices"),
        ({"client_timeout": 0}, "client_timeout must be a positive number of seconds"),
        ({"client_timeout": float("nan")}, "client_timeout must be a positive number"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ray(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_ip_address": "not-an-ip"}, "node_ip_address must be an IP address"),
        ({"address": "head"}, "address must be auto or HOST:PORT"),
    ],
)
def test_ray_refuses_bad_addresses_before_starting_anything(
    kwargs: dict[str, Any], message: str
) -> None:
    before = ray_pids()
    with pytest.raises(ValueError, match=message):
        Ray(**kwargs)
    assert strays(before) == set()


def test_a_portable_driver_gives_its_actors_the_pins(
    session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session's Ray instance started without the pins (a cluster started elsewhere):
    # the actors must receive them through their runtime environment.
    from blazefl_fn import portable

    with Ray(workers=1) as native:
        assert native.map(helpers.kernel_capability, [0]) != ["DEFAULT"]
    for name, value in portable.PINS.items():
        monkeypatch.setenv(name, value)
    with Ray(workers=1) as pinned:
        assert pinned.map(helpers.kernel_capability, [0]) == ["DEFAULT"]
