"""Executors: order, errors, worker deaths, interrupts, and no leaked processes or memory."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _executor_helpers as helpers
import pytest
import torch
from _procs import alive, descendants

from blazefl_fn import tree
from blazefl_fn.algorithms.stages import broadcast_params, mean_by_examples
from blazefl_fn.errors import ClientError, WorkerError
from blazefl_fn.executors import Executor, Processes, Sequential, Threads
from blazefl_fn.executors._startup import describe_exit
from blazefl_fn.executors.jobs import ClientContext, ClientUpdate
from blazefl_fn.keys import Key
from blazefl_fn.records import ServerState
from blazefl_fn.round import Algorithm, make_round
from blazefl_fn.run.simulate import run_rounds
from blazefl_fn.server.sampling import uniform_sampler

CLIENTS = [0.5 * i for i in range(10)]


def _algorithm(update: ClientUpdate[float], per_round: int = 10) -> Algorithm[float]:
    return Algorithm(
        name="toy",
        init=lambda key: ServerState(params={"w": torch.randn(4, generator=key.torch_generator())}),
        sample=uniform_sampler(len(CLIENTS), per_round),
        broadcast=broadcast_params,
        client_update=update,
        aggregate=mean_by_examples,
    )


def _rounds(
    executor: Executor,
    update: ClientUpdate[float] = helpers.noisy_update,
    clients: list[float] = CLIENTS,
) -> str:
    algo = _algorithm(update, per_round=6)
    state = algo.init(Key.from_seed(0))
    state, _ = run_rounds(make_round(algo, clients, executor), state, Key.from_seed(1), until=3)
    return tree.digest(state.params)


@pytest.fixture(scope="module")
def pool() -> Iterator[Processes]:
    with Processes(2) as executor:
        yield executor


# -- every executor: the map contract -------------------------------------------------------

FACTORIES: list[tuple[str, Callable[[], Executor]]] = [
    ("sequential", Sequential),
    ("threads-1", lambda: Threads(1)),
    ("threads-3", lambda: Threads(3)),
    ("processes-1", lambda: Processes(1)),
]


@pytest.mark.parametrize(("name", "factory"), FACTORIES, ids=[n for n, _ in FACTORIES])
def test_results_come_back_in_task_order(name: str, factory: Callable[[], Executor]) -> None:
    with factory() as executor:
        assert isinstance(executor, Executor)
        assert executor.map(helpers.finish_in_reverse, range(6)) == list(range(6))
        assert executor.map(helpers.square, []) == []


@pytest.mark.parametrize(("name", "factory"), FACTORIES, ids=[n for n, _ in FACTORIES])
def test_first_failure_in_task_order_is_raised_and_the_executor_survives(
    name: str, factory: Callable[[], Executor]
) -> None:
    with factory() as executor:
        with pytest.raises(ValueError, match="odd input 1"):
            executor.map(helpers.fail_on_odd, [0, 2, 1, 4, 3])
        assert executor.map(helpers.square, [1, 2]) == [1, 4]


@pytest.mark.parametrize(("name", "factory"), FACTORIES, ids=[n for n, _ in FACTORIES])
def test_every_executor_gives_the_sequential_bits(
    name: str, factory: Callable[[], Executor]
) -> None:
    with factory() as executor:
        assert _rounds(executor) == _rounds(Sequential())


@pytest.mark.parametrize(("name", "factory"), FACTORIES[1:], ids=[n for n, _ in FACTORIES[1:]])
def test_a_closed_executor_refuses_work(name: str, factory: Callable[[], Executor]) -> None:
    executor = factory()
    executor.close()
    executor.close()  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        executor.map(helpers.square, [1])


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_worker_counts_are_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        Threads(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        Processes(bad)  # type: ignore[arg-type]


def test_processes_refuses_plain_fork() -> None:
    with pytest.raises(ValueError, match=r"start_method must be one of \['spawn', 'forkserver'\]"):
        Processes(1, start_method="fork")


# -- processes: the pool ------------------------------------------------------------------


def test_the_context_goes_to_each_worker_once_per_pool(pool: Processes) -> None:
    before = pool.context_sends
    first = _rounds(pool)
    assert pool.context_sends - before == 2  # 3 rounds, 2 workers: one send per worker
    assert _rounds(pool) == first  # same update, same data: nothing sent again
    assert pool.context_sends - before == 2
    other_data = [x + 1.0 for x in CLIENTS]
    assert _rounds(pool, clients=other_data) == _rounds(Sequential(), clients=other_data)
    assert pool.context_sends - before == 4


def test_results_are_owned_copies_not_views_of_shared_slots(pool: Processes) -> None:
    algo = _algorithm(helpers.noisy_update)
    round_fn = make_round(algo, CLIENTS, pool)
    state = algo.init(Key.from_seed(0))
    first, _ = round_fn(state, Key.from_seed(5))
    kept = tree.digest(first.params)
    round_fn(first, Key.from_seed(6))  # writes new results into the same slots
    assert tree.digest(first.params) == kept


def test_client_error_names_client_and_round_with_remote_traceback(pool: Processes) -> None:
    algo = _algorithm(helpers.divide_by_zero_for_client_7)
    round_fn = make_round(algo, CLIENTS, pool)
    state = algo.init(Key.from_seed(0))
    with pytest.raises(ClientError, match="client 7 failed in round 1: ZeroDivisionError") as info:
        round_fn(state, Key.from_seed(0))
    cause = info.value.__cause__
    assert isinstance(cause, ZeroDivisionError)
    assert "divide_by_zero_for_client_7" in str(cause.__cause__)  # the worker's traceback
    assert pool.map(helpers.square, [3]) == [9]  # the pool is still usable


def test_an_exception_that_cannot_be_rebuilt_arrives_as_text(pool: Processes) -> None:
    with pytest.raises(RuntimeError, match="Unpicklable: 4-4") as info:
        pool.map(helpers.raise_unpicklable, [4])
    assert "raise_unpicklable" in str(info.value.__cause__)


def test_unpicklable_functions_are_refused_clearly(pool: Processes) -> None:
    with pytest.raises(TypeError, match="Processes needs picklable work"):
        pool.map(lambda x: x, [1])
    assert pool.map(helpers.square, [2]) == [4]


def test_a_worker_killed_mid_round_is_reported_and_the_pool_cleaned_up() -> None:
    executor = Processes(2)
    pids = executor.map(helpers.pid, [0, 1, 2, 3])
    assert len(set(pids)) == 2
    algo = _algorithm(helpers.sigkill_for_client_2)
    start = time.monotonic()
    with pytest.raises(
        WorkerError, match=r"was killed by SIGKILL while running client 2 in round 1"
    ):
        make_round(algo, CLIENTS, executor)(algo.init(Key.from_seed(0)), Key.from_seed(0))
    assert time.monotonic() - start < 10
    assert not any(alive(p) for p in set(pids))
    with pytest.raises(RuntimeError, match="is closed"):
        executor.map(helpers.square, [1])


def test_a_worker_that_died_between_rounds_is_reported() -> None:
    executor = Processes(2)
    pids = sorted(set(executor.map(helpers.pid, [0, 1, 2, 3])))
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(WorkerError, match=rf"worker process {pids[0]} was killed by SIGKILL"):
        executor.map(helpers.square, [1, 2, 3])
    assert not any(alive(p) for p in pids)


_LEAK_CHECK = textwrap.dedent(
    """
    import gc, os, re, sys
    sys.path.insert(0, {tests!r})
    import test_executors as t
    from blazefl_fn.executors import Processes, Sequential
    import _executor_helpers as helpers

    def shm(pids):
        # /dev/shm is shared by every process on the machine: count only segments named after
        # this process or its workers (torch names them torch_<pid>_...).
        names = os.listdir("/dev/shm")
        return {{n for n in names if any(re.match(rf"torch_{{p}}_", n) for p in pids)}}

    def fds():
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    if __name__ == "__main__":
        # multiprocessing starts per-process singletons on first use (the resource tracker's
        # pipe, the descriptor-sharing listener, its temporary directory) that live as long as
        # this process: start them before counting, so that only the executor's are counted.
        with Processes(1) as warm_up:
            t._rounds(warm_up)
        fds_before = fds()
        temp_before = set(os.listdir(os.environ["TMPDIR"]))
        with Processes(2) as executor:
            pids = {{os.getpid(), *(w.process.pid for w in executor._workers)}}
            digest = t._rounds(executor)
            assert executor.map(helpers.square, [5]) == [25]
        assert digest == t._rounds(Sequential())
        temp_after = set(os.listdir(os.environ["TMPDIR"]))
        print(sorted(shm(pids)), fds() - fds_before, sorted(temp_after - temp_before))
    """
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private temporary directory with a short path, for a child's ``TMPDIR``.

    multiprocessing binds its sockets there (``pymp-*/listener-*``), and an AF_UNIX path holds
    at most 107 bytes: under ``tmp_path`` in a parallel run
    (``/tmp/pytest-of-USER/pytest-N/popen-gwK/<test name>/``) it did not fit.
    """
    path = Path(tempfile.mkdtemp(prefix="bfl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_no_shared_memory_or_descriptor_outlives_the_executor(
    tmp_path: Path, scratch: Path
) -> None:
    # In a process of its own with a private temporary directory: it observes only what its
    # own executor made, whatever else runs on the machine (issue 35: a count of pymp-*
    # entries in the shared /tmp failed whenever another program used multiprocessing).
    script = tmp_path / "leak_check.py"
    script.write_text(_LEAK_CHECK.format(tests=str(Path(__file__).parent)))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
        check=False, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # No segment, descriptor or temporary file of the executor's is left.
    assert done.stdout.split() == ["[]", "0", "[]"], done.stdout


_INTERRUPTED = textwrap.dedent(
    """
    import faulthandler, os, signal, sys
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's view if it hangs
    # As a program started from a terminal has it: a suite started as a background job of a
    # non-interactive shell inherits SIGINT ignored, and Python then keeps ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    import _executor_helpers as helpers
    from blazefl_fn.executors import Processes

    if __name__ == "__main__":
        executor = Processes(2)
        pids = executor.map(helpers.pid, [0, 1, 2, 3])
        print(" ".join(str(p) for p in sorted(set(pids))), flush=True)
        try:
            executor.map(helpers.sleep_forever, [0, 1])
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            raise
    """
)


def test_ctrl_c_during_a_round_leaves_no_worker_behind(tmp_path: Path) -> None:
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED.format(tests=str(Path(__file__).parent)))
    with subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C would see it
    ) as child:  # its pipes are closed however the test ends
        assert child.stdout is not None
        worker_pids = [int(p) for p in child.stdout.readline().split()]
        assert len(worker_pids) == 2, child.stderr.read() if child.stderr else ""
        time.sleep(0.5)  # the workers are now inside sleep_forever
        os.killpg(child.pid, signal.SIGINT)
        try:
            _, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack, to stderr
            time.sleep(1)
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"no exit within 30 s of Ctrl-C; the child's stderr:\n{err}")
    assert child.returncode != 0
    assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while any(alive(p) for p in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in worker_pids)


def test_threads_cancel_what_has_not_started() -> None:
    started: list[int] = []

    def record(x: int) -> int:
        started.append(x)
        if x == 0:
            raise ValueError("first")
        time.sleep(0.05)
        return x

    with Threads(1) as executor, pytest.raises(ValueError, match="first"):
        executor.map(record, list(range(20)))
    assert len(started) < 20


def test_prepare_sends_a_context_once_and_refuses_unpicklable_ones(pool: Processes) -> None:
    context = ClientContext(helpers.square, [1, 2])
    before = pool.context_sends
    pool.prepare(context)
    pool.prepare(context)
    assert pool.context_sends == before + pool.workers
    with pytest.raises(TypeError, match="Processes needs picklable work"):
        pool.prepare(ClientContext(lambda *_: None, []))
    assert pool.map(helpers.square, [5]) == [25]  # still usable


def test_prepare_on_a_closed_pool_raises() -> None:
    executor = Processes(1)
    executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        executor.prepare(ClientContext(helpers.square, []))


# -- hardening: what an adversarial client or a dead parent does -----------------------------


@pytest.mark.parametrize("make", [Sequential, lambda: Threads(2)], ids=["sequential", "threads"])
def test_a_client_calling_sys_exit_fails_its_round(make: Callable[[], Executor]) -> None:
    # Before: the bare SystemExit escaped and ended the driving process.
    with (
        make() as executor,
        pytest.raises(ClientError, match=r"client 2 failed in round 1: SystemExit: 4"),
    ):
        _rounds(executor, helpers.exits_for_client_2)


def test_an_uplink_that_cannot_be_pickled_back_is_a_client_error(pool: Processes) -> None:
    # Before: "worker process ... exited with code 1", and the pool was gone.
    with pytest.raises(
        ClientError, match=r"client 1 failed in round 1: TypeError: its result cannot be sent back"
    ):
        _rounds(pool, helpers.unsendable_for_client_1)
    assert _rounds(pool) == _rounds(Sequential())  # the pool survived


@pytest.mark.slow
def test_workers_exit_silently_within_a_second_of_their_parents_death(tmp_path: Path) -> None:
    # Before: after a SIGKILL of the driver, workers and their pipes lived up to 6.5 s and
    # printed BrokenPipe tracebacks. Here every worker is busy in a client when the parent dies.
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            sys.path.insert(0, sys.argv[1])
            import _executor_helpers as helpers
            from blazefl_fn.executors import Processes

            if __name__ == "__main__":
                with Processes(2) as pool:
                    print(*sorted(set(pool.map(helpers.pid, [0, 1, 2, 3]))), flush=True)
                    pool.map(helpers.sleep_forever, [0, 1])
            """
        )
    )
    parent = subprocess.Popen(
        [sys.executable, str(script), str(Path(__file__).parent)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(0.5)  # both are inside sleep_forever
        parent.kill()
        killed = time.monotonic()
        _, stderr = parent.communicate(timeout=30)
        while any(alive(w) for w in workers) and time.monotonic() - killed < 5:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers)
        assert time.monotonic() - killed < 1.5
    finally:
        parent.kill()
        parent.communicate()
    assert stderr == ""  # the workers share the parent's stderr: they printed nothing


# -- client_timeout (issue 21, item 9: a worker stopped with SIGSTOP hung the round forever) -----


def test_a_stopped_worker_becomes_a_worker_error_within_the_timeout() -> None:
    ex = Processes(2, client_timeout=1.0)
    try:
        pids = set(ex.map(helpers.pid, [0, 1, 2, 3]))
        start = time.monotonic()
        message = r"gave no result for task 2 within client_timeout=1 s"
        with pytest.raises(WorkerError, match=message):
            ex.map(helpers.stop_self_on, [0, 1, 2, 3, 4, 5])
        assert time.monotonic() - start < 10
        for pid in pids:  # every worker, the stopped one included, is gone
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        with pytest.raises(RuntimeError, match="closed"):
            ex.map(helpers.square, [1])
    finally:
        ex.close()


def test_client_timeout_does_not_fire_on_slow_but_progressing_work() -> None:
    with Processes(1, client_timeout=1.0) as ex:
        # Each task takes 0.2 s; the whole map (1.6 s) takes longer than the timeout.
        assert len(set(ex.map(helpers.pid, list(range(8))))) == 1


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "5"])
def test_client_timeout_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="client_timeout must be a positive number"):
        Processes(1, client_timeout=bad)  # type: ignore[arg-type]


# -- a worker that cannot start says why ---------------------------------------------------------

_UNGUARDED = """
import blazefl_fn as fl
with fl.Processes(2) as ex:
    print(ex.map(abs, [-1, 2]))
"""


def _one_reason(stderr: str) -> str:
    # One traceback, the user's own, ending in the reason; no worker's traceback, no "None".
    assert stderr.count("Traceback (most recent call last)") == 1, stderr
    assert "code None" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("blazefl_fn.errors.WorkerError: "), last
    return last


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_script_without_the_main_guard_is_told_to_add_it(
    tmp_path: Path, start_method: str
) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        _UNGUARDED.replace("Processes(2)", f"Processes(2, start_method={start_method!r})")
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 1
    reason = _one_reason(done.stderr)
    assert f"each imports {script} again" in reason
    assert 'if __name__ == "__main__":' in reason


def test_a_script_on_standard_input_is_told_to_use_a_file(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-"], input=_UNGUARDED, capture_output=True, text=True, timeout=300,
        check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    reason = _one_reason(done.stderr)
    assert "this script has none (<stdin>); save it to a file" in reason


def test_a_worker_killed_before_it_is_reaped_is_described_by_its_signal() -> None:
    process = mp.get_context("spawn").Process(target=time.sleep, args=(60,))
    process.start()
    os.kill(process.pid, signal.SIGKILL)
    assert describe_exit(process) == "was killed by SIGKILL"  # not "exited with code None"


# -- nothing left in the temporary directory, even by killed processes --------------------------

_POOL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    from blazefl_fn.errors import WorkerError
    from blazefl_fn.executors import Processes

    def tensor(x):  # sent back through a shared descriptor: multiprocessing makes a pymp-* dir
        return torch.zeros(1000) + x

    if __name__ == "__main__":
        executor = Processes(2)
        executor.map(tensor, [1, 2, 3, 4, 5, 6])
        if sys.argv[1] == "kill-workers":
            for worker in executor._workers:
                os.kill(worker.process.pid, signal.SIGKILL)
            try:
                executor.map(tensor, [1])
            except WorkerError:
                print("worker error", flush=True)
        elif sys.argv[1] == "wait":
            print("ready", flush=True)
            time.sleep(600)
        else:
            executor.close()
    """
)


def _pool_script(tmp_path: Path, scratch: Path, mode: str, **popen: Any) -> subprocess.Popen[str]:
    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "TMPDIR": str(scratch)}, **popen,
    )  # fmt: skip


def test_killed_workers_leave_nothing_in_the_temporary_directory(
    tmp_path: Path, scratch: Path
) -> None:
    # Before: each killed worker left its pymp-* directory in the temporary directory.
    proc = _pool_script(tmp_path, scratch, "kill-workers")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == "worker error\n"
    assert os.listdir(scratch) == []


def test_workers_of_a_driver_killed_with_sigkill_leave_nothing_behind(
    tmp_path: Path, scratch: Path
) -> None:
    proc = _pool_script(tmp_path, scratch, "wait")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    family = descendants(proc.pid)
    # One pymp-* directory, the driver's: its workers share it rather than make their own.
    (driver_dir,) = os.listdir(scratch)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30  # the workers notice their parent is gone
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in family)
    # The driver's own directory stays, as any Python program's killed with SIGKILL does.
    assert os.listdir(scratch) == [driver_dir]
