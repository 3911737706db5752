"""The command line on Ray, in fresh processes: a local instance started and stopped by the
executor, whatever ends the run (its end, Ctrl-C, SIGTERM, SIGKILL), and Ray flags checked
before anything starts.

No Ray instance runs in this process here: the leftover checks count what each command left
(`strays`), and nothing else of Ray should be starting meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import attrs
import pytest
from _ray_helpers import ENV, HEAD_IP, describe, ray_pids, strays, wait_until_gone

from blazefl_fn.run.config import RunConfig

pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[ray]'")

# Tests that start Ray run one at a time, on one worker of a parallel run (`make test`'s
# `--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("ray")


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
    left = wait_until_gone(strays(before))
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
    left = wait_until_gone(strays(before))
    assert left == set(), describe(left)


def test_cli_ray_without_ray_installed_says_how_to_get_it() -> None:
    # A fresh interpreter where `import ray` fails: one line, exit 1.
    code = (
        "import sys; sys.modules['ray'] = None; from blazefl_fn.cli._commands import main; "
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
    from blazefl_fn.cli._commands import main

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
    from blazefl_fn.cli._commands import main

    start = time.monotonic()
    assert main(["run", "--executor", "ray", *flags, "--rounds", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"blazefl-fn: error: {message}"), line
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("flag", ["--ray-address", "--ray-node-ip"])
def test_cli_ray_flags_with_another_executor_are_refused(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from blazefl_fn.cli._commands import main

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


@pytest.mark.slow
def test_cli_sigkill_takes_the_local_ray_instance_with_it() -> None:
    # Before: Ray's DashboardAgent and RuntimeEnvAgent lived on for 60-75 s.
    before = ray_pids()
    run = _cli("--rounds", "100000")
    assert run.stdout is not None
    first = run.stdout.readline()  # the first round's line: Ray and its actors are up
    if not first.startswith("round"):
        run.kill()
        out, err = run.communicate(timeout=60)
        raise AssertionError(f"exit {run.returncode}: {first + out!r} {err!r}")
    run.kill()
    run.communicate(timeout=60)
    left = wait_until_gone(strays(before), seconds=15)
    assert left == set(), describe(left)


@pytest.mark.slow
def test_cli_sigterm_stops_like_ctrl_c_and_leaves_no_ray_process() -> None:
    # Before: Ray's handler printed a six-line "*** SIGTERM received" dump and exited 1.
    before = ray_pids()
    run = _cli("--rounds", "100000")
    assert run.stdout is not None
    first = run.stdout.readline()  # the first round's line: Ray and its actors are up
    if not first.startswith("round"):
        # A run that ended early: say why, and leave no process or pipe for the next test.
        run.kill()
        out, err = run.communicate(timeout=60)
        raise AssertionError(f"exit {run.returncode}: {first + out!r} {err!r}")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert err.strip().splitlines() == [
        "blazefl-fn: terminated; nothing was saved (no --checkpoint-dir)"
    ]
    left = wait_until_gone(strays(before))
    assert left == set(), describe(left)


def test_ray_settings_may_change_on_resume() -> None:
    from blazefl_fn.run.simulate import check_resumable

    check_resumable(RunConfig(), attrs.evolve(RunConfig(), executor="ray", ray_address="auto"))
