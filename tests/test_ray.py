"""The Ray executor on a real local Ray instance (loopback only): bits, faults, cleanup, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import _executor_helpers as helpers
import attrs
import pytest
import torch
from _ray_helpers import ENV, HEAD_IP, describe, ray_env, ray_pids, wait_until_gone

from benchmarks.gpu_check import tiny_federation
from blazefl_fn import tree
from blazefl_fn.executors import Ray, Sequential, WorkerError
from blazefl_fn.jobs import ClientContext, ClientError, ClientJob, ClientTask
from blazefl_fn.keys import Key
from blazefl_fn.records import Downlink
from blazefl_fn.reproducibility import intra_op_threads
from blazefl_fn.round import make_round
from blazefl_fn.run import ALGORITHMS, RunConfig, load_federation, make_algorithm, run_rounds
from blazefl_fn.run import model_factory as factory_for

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[ray]'")

__all__ = ["ray_env"]  # a fixture, used by name

CPUS = 4

# Ray's processes are counted machine-wide (`ray_pids`): tests that start Ray run one at a time,
# on one worker of a parallel run (`make test`'s `--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("ray")


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


def _digest(algorithm: Any, clients: Any, executor: Any, rounds: int = 2) -> str:
    key = Key.from_seed(0)
    with intra_op_threads(1):
        state, _ = run_rounds(
            make_round(algorithm, clients, executor), algorithm.init(key.fold_in("init")), key,
            rounds,
        )  # fmt: skip
    return tree.digest(state.params)


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
        config = RunConfig(algorithm=algorithm, clients=8, clients_per_round=6, batch_size=5)
        data = load_federation(config, Key.from_seed(0).fold_in("data"))
        model_fn = factory_for(config, data)
    algo = make_algorithm(config, model_fn, len(data.clients), data)
    with Sequential() as sequential:
        expected = _digest(algo, data.clients, sequential)
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


# -- the command line, in fresh processes: Ray started and stopped by the executor --------------


def _cli(*flags: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "run", "--executor", "ray", "--ray-node-ip",
         HEAD_IP, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
        **popen,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_ray_prints_the_sequential_digest_and_leaves_no_ray_process() -> None:
    before = ray_pids()
    done = _cli("--rounds", "3", "--json", "--quiet")
    out, err = done.communicate(timeout=180)
    assert done.returncode == 0, err
    plain = subprocess.run(
        [sys.executable, "-m", "blazefl_fn", "run", "--rounds", "3", "--json", "--quiet"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out)["params_sha256"] == json.loads(plain.stdout)["params_sha256"]
    left = wait_until_gone(ray_pids() - before)
    assert left == set(), describe(left)


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["cli-only", "process-group"])
def test_cli_ctrl_c_mid_run_stops_and_leaves_no_ray_process(group: bool) -> None:
    # A terminal's Ctrl-C reaches the whole process group, Ray's own processes included.
    before = ray_pids()
    run = _cli(
        "--rounds", "100000", "--clients", "50", "--clients-per-round", "50",
        start_new_session=True,
    )  # fmt: skip
    assert run.stdout is not None
    first = run.stdout.readline()  # the first round's line: Ray and its actors are up
    assert first.startswith("round"), first + (run.stderr.read() if run.stderr else "")
    if group:
        os.killpg(run.pid, signal.SIGINT)
    else:
        run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130
    assert err.strip().splitlines()[-1] == (
        "blazefl-fn: interrupted; nothing was saved (no --checkpoint-dir)"
    )
    assert wait_until_gone(ray_pids() - before) == set()


def test_cli_ray_without_ray_installed_says_how_to_get_it() -> None:
    # A fresh interpreter where `import ray` fails: one line, exit 1.
    code = (
        "import sys; sys.modules['ray'] = None; from blazefl_fn.cli import main; "
        "sys.exit(main(['run', '--executor', 'ray', '--rounds', '1', '--quiet']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "blazefl-fn: error: the Ray executor needs Ray: pip install 'blazefl_fn[ray]'"
    )


@pytest.mark.parametrize("flag", ["--ray-address", "--ray-node-ip"])
def test_cli_bad_ray_flags_are_one_line_with_exit_2(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from blazefl_fn.cli import main

    assert main(["run", "--executor", "ray", flag, " ", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    field = flag[2:].replace("-", "_")
    assert err == [f"blazefl-fn: error: {field} must be a non-empty string, got ' '"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ray-node-ip", "not-an-ip"], "ray_node_ip must be an IP address, got 'not-an-ip'"),
        (["--ray-node-ip", "999.1.1.1"], "ray_node_ip must be an IP address, got '999.1.1.1'"),
        # TEST-NET-1 (RFC 5737): never an address of a real machine.
        (["--ray-node-ip", "192.0.2.1"], "ray_node_ip 192.0.2.1 is not an address of this machine"),
        (["--ray-address", "127.0.0.1:70000"], "ray_address must be auto or HOST:PORT"),
        (["--ray-address", "head"], "ray_address must be auto or HOST:PORT"),
    ],
)
def test_cli_ray_addresses_are_checked_at_parse_time(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: each of these ran for minutes (Ray waiting for a GCS or an address) and never
    # exited on its own.
    from blazefl_fn.cli import main

    start = time.monotonic()
    assert main(["run", "--executor", "ray", *flags, "--rounds", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"blazefl-fn: error: {message}"), line
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("flag", ["--ray-address", "--ray-node-ip"])
def test_cli_ray_flags_with_another_executor_are_refused(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from blazefl_fn.cli import main

    value = "auto" if flag == "--ray-address" else "127.0.0.1"
    assert main(["run", "--executor", "processes", flag, value, "--rounds", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "blazefl-fn: error: ray_address and ray_node_ip apply to the ray executor, not to "
        "'processes'"
    )


def test_cli_a_cluster_that_does_not_answer_is_one_line_within_seconds() -> None:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "blazefl_fn", "run", "--executor", "ray", "--ray-address",
         "127.0.0.1:1", "--rounds", "1"],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **ENV},
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "blazefl-fn: error: no Ray cluster answers at 127.0.0.1:1 (connection refused); start "
        "one there (ray start --head) or pass its address"
    ]
    assert time.monotonic() - start < 30


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
    assert ray_pids() == before


@pytest.mark.slow
def test_cli_sigkill_takes_the_local_ray_instance_with_it() -> None:
    # Before: Ray's DashboardAgent and RuntimeEnvAgent lived on for 60-75 s.
    before = ray_pids()
    run = _cli("--rounds", "100000")
    assert run.stdout is not None
    first = run.stdout.readline()  # the first round's line: Ray and its actors are up
    assert first.startswith("round"), first + (run.stderr.read() if run.stderr else "")
    run.kill()
    run.communicate(timeout=60)
    assert wait_until_gone(ray_pids() - before, seconds=15) == set()


@pytest.mark.slow
def test_cli_sigterm_stops_like_ctrl_c_and_leaves_no_ray_process() -> None:
    # Before: Ray's handler printed a six-line "*** SIGTERM received" dump and exited 1.
    before = ray_pids()
    run = _cli("--rounds", "100000")
    assert run.stdout is not None
    assert run.stdout.readline().startswith("round")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert err.strip().splitlines() == [
        "blazefl-fn: terminated; nothing was saved (no --checkpoint-dir)"
    ]
    assert wait_until_gone(ray_pids() - before) == set()


def test_ray_settings_may_change_on_resume() -> None:
    from blazefl_fn.run import check_resumable

    check_resumable(RunConfig(), attrs.evolve(RunConfig(), executor="ray", ray_address="auto"))


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
