"""A two-node Ray cluster on this machine (loopback only): the same bits, and a node's death.

The fixture runs ``ray start --head`` on 127.0.0.2 and a second node on 127.0.0.3, each with one
CPU, so the executor's two actors land on different nodes; it ``ray stop``s everything after.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _executor_helpers as helpers
import pytest
import torch
from _ray_helpers import ENV, HEAD_IP, NODE_IP, describe, ray_pids, strays, wait_until_gone

from benchmarks.gpu_check import tiny_federation
from blazefl_fn import tree
from blazefl_fn.cli import main
from blazefl_fn.errors import WorkerError
from blazefl_fn.executors import Ray, Sequential
from blazefl_fn.executors.jobs import ClientContext, ClientJob
from blazefl_fn.keys import Key
from blazefl_fn.models import intra_op_threads
from blazefl_fn.records import ClientTask, Downlink
from blazefl_fn.round import make_round
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import load_federation, make_algorithm, model_factory, run_rounds

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[ray]'")

# Ray processes are counted machine-wide: tests that start Ray share one worker of a parallel
# run (`make test` uses `--dist loadgroup`).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

RAY_CLI = str(Path(sys.executable).parent / "ray")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ray_cli(*args: str) -> None:
    subprocess.run([RAY_CLI, *args], env={**os.environ, **ENV}, check=True,
                   capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """``{"address": ..., "node_port": ...}`` of a running head + one worker node."""
    before = ray_pids()
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    port, node_port = _free_port(HEAD_IP), _free_port(NODE_IP)
    try:
        _ray_cli("start", "--head", f"--port={port}", f"--node-ip-address={HEAD_IP}",
                 "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats")  # fmt: skip
        _ray_cli("start", f"--address={HEAD_IP}:{port}", f"--node-ip-address={NODE_IP}",
                 "--num-cpus=1", f"--node-manager-port={node_port}")  # fmt: skip
        yield {"address": f"{HEAD_IP}:{port}", "node_port": node_port}
    finally:
        subprocess.run([RAY_CLI, "stop", "--force"], env={**os.environ, **ENV},
                       capture_output=True, check=False, timeout=120)  # fmt: skip
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        left = wait_until_gone(strays(before))
        assert left == set(), describe(left)


def _digest(algorithm: Any, clients: Any, executor: Any) -> str:
    key = Key.from_seed(0)
    with intra_op_threads(1):
        state, _ = run_rounds(
            make_round(algorithm, clients, executor),
            algorithm.init(key.fold_in("init")),
            key,
            until=2,
        )
    return tree.digest(state.params)


def _raylet_of(node_port: int) -> int:
    out = subprocess.run(["pgrep", "-af", "raylet"], capture_output=True, text=True,
                         check=False).stdout  # fmt: skip
    for line in out.splitlines():
        if f"--node_manager_port={node_port}" in line:
            return int(line.split()[0])
    raise AssertionError(f"no raylet with node manager port {node_port}:\n{out}")


def test_two_nodes_give_the_sequential_bits_and_the_cluster_is_left_running(
    cluster: dict[str, Any],
) -> None:
    federation = tiny_federation()
    config = RunConfig(
        algorithm="scarlet", dataset="mnist", data_dir="-", clients=8, clients_per_round=5,
        batch_size=8, lr=0.05, public_size=40, public_per_round=12,
    )  # fmt: skip
    scarlet = make_algorithm(config, federation.model_fn, 8, federation.data)
    plain = RunConfig(clients=8, clients_per_round=6, batch_size=5)
    data = load_federation(plain, Key.from_seed(0).fold_in("data"))
    fedavg = make_algorithm(plain, model_factory(plain, data), 8, data)
    with Sequential() as sequential:
        expected = [
            _digest(scarlet, federation.data.clients, sequential),
            _digest(fedavg, data.clients, sequential),
        ]
    with Ray(cluster["address"], workers=2, node_ip_address=HEAD_IP) as executor:
        nodes = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        assert nodes == {HEAD_IP, NODE_IP}
        got = [
            _digest(scarlet, federation.data.clients, executor),
            _digest(fedavg, data.clients, executor),
        ]
    assert got == expected
    assert not ray.is_initialized()  # this process disconnected...
    assert _raylet_of(cluster["node_port"]) > 0  # ...and the cluster runs on


# A sweep of two tiny cells (`tests/test_sweep.py`'s job); checkpoints every 5 rounds so that a
# stopped cell has one to resume from.
_SWEEP = (
    "clients = 6\nclients-per-round = 3\nbatch_size = 20\ncheckpoint-every = 5\n"
    "rounds = {rounds}\n[sweep]\nseed = [0, 1]\n"
)


def _single_run_digests(rounds: int, capsys: pytest.CaptureFixture[str]) -> dict[int, str]:
    digests: dict[int, str] = {}
    for seed in (0, 1):
        flags = ["--clients=6", "--clients-per-round=3", "--batch-size=20", f"--rounds={rounds}"]
        assert main(["run", *flags, f"--seed={seed}", "--json", "--quiet"]) == 0
        digests[seed] = json.loads(capsys.readouterr().out)["params_sha256"]
    return digests


def _sweep_digests(out: Path) -> dict[int, str]:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    return {r["config"]["seed"]: r["params_sha256"] for r in results}


def _sweep(exp: Path, out: Path, cluster: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "sweep", str(exp), "--out", str(out),
         "--ray-address", cluster["address"], "--ray-node-ip", HEAD_IP],
        cwd=exp.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_sweep_runs_its_cells_as_tasks_with_the_bits_of_single_runs(
    cluster: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp, out = tmp_path / "exp.toml", tmp_path / "out"
    exp.write_text(_SWEEP.format(rounds=3))
    before = ray_pids()
    sweep = _sweep(exp, out, cluster)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr
    assert "up to 2 at a time (each up to 1 CPU(s) of the Ray cluster at" in stdout
    assert stdout.count(" done  seed=") == 2
    assert _sweep_digests(out) == _single_run_digests(3, capsys)
    assert (out / "summary.csv").is_file()
    # The driver left; the cluster runs on, and nothing of the driver's stays behind.
    assert wait_until_gone(strays(before)) == set()
    assert _raylet_of(cluster["node_port"]) > 0


def test_a_ray_sweep_stopped_by_ctrl_c_resumes_to_the_bits_of_single_runs(
    cluster: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp, out = tmp_path / "exp.toml", tmp_path / "out"
    exp.write_text(_SWEEP.format(rounds=400))
    sweep = _sweep(exp, out, cluster)
    deadline = time.monotonic() + 120
    # Both cells are past a checkpoint (round 5) and still running.
    while len([p for p in out.glob("*/metrics.jsonl") if p.read_text().count("\n") > 6]) < 2:
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    sweep.send_signal(signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    assert "stopped cells keep their checkpoints" in stderr
    # Each cell was stopped as Ctrl-C stops a run: its final checkpoint, its own message.
    for log in out.glob("*/stderr.log"):
        assert "interrupted; checkpoint of the last completed round saved" in log.read_text()
    assert not list(out.glob("*/result.json"))
    sweep = _sweep(exp, out, cluster)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr
    assert "2 cells, 0 finished already" in stdout
    assert _sweep_digests(out) == _single_run_digests(400, capsys)


def test_a_node_killed_mid_round_is_a_worker_error_within_10_s(cluster: dict[str, Any]) -> None:
    downlink = Downlink(round=5, params={"w": torch.zeros(4)})
    job = ClientJob(ClientContext(helpers.sleep_forever_update, [0.0] * 4), downlink)
    tasks = [ClientTask(k, 5, Key.from_seed(k)) for k in range(4)]
    with Ray(cluster["address"], workers=2, node_ip_address=HEAD_IP) as executor:
        raylet = _raylet_of(cluster["node_port"])
        threading.Timer(1.0, os.kill, (raylet, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"died .* while running client \d in round 6"):
            executor.map(job, tasks)
        assert time.monotonic() - start < 10
