"""Devices: parsing, the client-to-device map, placement once, routing, determinism switches.

CPU-only: device lists such as ``["cpu", "cpu"]`` run every part of the device machinery
except CUDA itself (tests/test_cuda.py, which skips without a GPU).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator

import _executor_helpers as helpers
import attrs
import pytest
import torch
from _training import train_local
from hypothesis import given
from hypothesis import strategies as st

from blazefl_fn import tree
from blazefl_fn.algorithms.stages import broadcast_params, mean_by_examples
from blazefl_fn.cli._commands import main
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.executors import Executor, Processes, Sequential, Threads
from blazefl_fn.executors._placement import PlacedJob, Placement, owned_groups, placed, worker_for
from blazefl_fn.executors.devices import (
    check_device,
    check_devices,
    cuda_determinism,
    device_for,
    parse_devices,
    to_device,
)
from blazefl_fn.executors.jobs import ClientContext, ClientJob
from blazefl_fn.keys import Key
from blazefl_fn.models import build_module, logistic_regression
from blazefl_fn.records import ClientTask, Downlink, ServerState, Uplink
from blazefl_fn.round import Algorithm, make_round, on_server
from blazefl_fn.run.config import ALGORITHMS, DISTILLATION, RunConfig
from blazefl_fn.run.simulate import check_resumable, run_rounds, simulate
from blazefl_fn.server.sampling import uniform_sampler

CPU = torch.device("cpu")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA messages")

# -- parsing and checking ------------------------------------------------------------------


def test_cpu_and_auto_without_a_gpu_parse_to_the_cpu() -> None:
    assert parse_devices("cpu") == (CPU,)
    assert parse_devices(" cpu , cpu ") == (CPU, CPU)
    if not torch.cuda.is_available():
        assert parse_devices("auto") == (CPU,)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "malformed device list ''"),
        ("cpu,,cpu", "malformed device list 'cpu,,cpu'"),
        ("cpu,", "malformed device list 'cpu,'"),
        ("tpu", "malformed device 'tpu'"),
        ("cuda:x", "malformed device 'cuda:x'"),
        ("meta", "unsupported device 'meta' (cpu and cuda only)"),
    ],
)
def test_malformed_device_lists_name_the_value_and_what_is_available(
    spec: str, message: str
) -> None:
    with pytest.raises(ValueError, match="available: cpu") as info:
        parse_devices(spec)
    assert message in str(info.value)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1", "cpu,cuda:0"])
def test_cuda_without_cuda_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="needs CUDA, which is not available here"):
        parse_devices(spec)


def test_device_arguments_of_the_wrong_type_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"str or torch\.device, got int"):
        check_device(0)
    with pytest.raises(TypeError, match="sequence of devices, got 'cpu'"):
        check_devices("cpu")
    with pytest.raises(ValueError, match="at least one device"):
        check_devices([])
    with pytest.raises(TypeError, match="sequence of devices"):
        Threads(1, devices="cpu")
    with pytest.raises(ValueError, match="device or devices, not both"):
        Sequential("cpu", devices=["cpu"])


# -- the client-to-device map --------------------------------------------------------------


@given(st.integers(0, 10**9), st.integers(1, 8))
def test_a_clients_device_is_a_function_of_its_id_alone(client: int, n: int) -> None:
    devices = tuple(torch.device("cpu", i) for i in range(n))
    assert device_for(client, devices) == devices[client % n]


@given(st.integers(1, 12), st.integers(1, 12))
def test_every_device_is_served_and_every_worker_serves(workers: int, devices: int) -> None:
    owned = [owned_groups(w, workers, devices) for w in range(workers)]
    assert set().union(*owned) == set(range(devices))
    assert all(owned)
    if devices >= workers:
        # Dealt out: no device is served by two workers.
        assert sum(len(o) for o in owned) == devices
    else:
        assert all(len(o) == 1 for o in owned)


@given(st.integers(1, 9), st.integers(1, 9))
def test_a_sticky_client_goes_to_one_owner_of_its_device_and_every_owner_gets_some(
    workers: int, devices: int
) -> None:
    clients = range(4 * workers * devices)
    chosen = {k: worker_for(k, workers, devices) for k in clients}
    for k, w in chosen.items():
        assert k % devices in owned_groups(w, workers, devices)
    assert set(chosen.values()) == set(range(workers))


# -- placement -------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class _Record:
    weights: torch.Tensor
    nested: dict[str, tuple[torch.Tensor, int]]
    name: str = "r"


def test_placement_on_the_device_a_tree_is_on_returns_it_unchanged() -> None:
    shared = torch.ones(3)
    record = _Record(shared, {"a": (shared, 1)})
    assert to_device(record, CPU) is record
    module = torch.nn.Linear(2, 2)
    assert to_device(module, CPU) is module
    assert to_device([shared, 2, "x"], CPU)[0] is shared


def test_placement_moves_an_object_met_twice_once_and_never_writes_its_input() -> None:
    # "cpu:0" is a different device object than the plain CPU, so tensors are re-made.
    target = torch.device("meta")
    shared = torch.ones(3)
    record = _Record(shared, {"a": (shared, 1)})
    memo: dict[int, object] = {}
    placed = to_device(record, target, memo)
    assert placed is not record
    assert placed.weights.device == target
    assert placed.nested["a"][0] is placed.weights  # moved once, shared as before
    assert placed.nested["a"][1] == 1
    assert placed.name == "r"
    assert record.weights is shared
    assert shared.device == CPU
    assert to_device(record, target, memo) is placed  # the memo remembers it


def test_a_gathered_client_yields_the_same_batches() -> None:
    base = TensorDataset(torch.randn(50, 3), torch.arange(50) % 4)
    client = ClientData(base, torch.tensor([3, 7, 8, 20, 21, 30, 41, 42, 49]))
    gathered = client.gathered(CPU)
    assert len(gathered.base) == len(client)
    for seed in range(3):
        a = list(client.batches(4, Key.from_seed(seed).torch_generator()))
        b = list(gathered.batches(4, Key.from_seed(seed).torch_generator()))
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb)
            assert torch.equal(ya, yb)
    assert client.to_device(CPU) is client


SIX = [0.5 * i for i in range(6)]


def _job() -> ClientJob[float]:
    # A new context each call, over the same data, as `run_round` makes one per round.
    downlink = Downlink(round=0, params={"w": torch.zeros(4)})
    return ClientJob(ClientContext(helpers.pid_update, SIX), downlink)


def test_placement_moves_each_clients_data_once_onto_its_own_device() -> None:
    placement = Placement((CPU, CPU, CPU))
    for round_index in range(3):
        placed = placement.job(_job())
        for k in range(6):
            uplink = placed(ClientTask(k, round_index, Key.from_seed(k)))
            assert uplink.client_id == k
    assert dict(placement.placements) == {(k, k % 3): 1 for k in range(6)}
    placement.clear()


def test_cpu_jobs_run_as_they_are_unless_the_server_is_elsewhere() -> None:
    cpu_job = _job()
    assert placed(Placement((CPU,)), cpu_job) is cpu_job
    assert isinstance(placed(Placement((CPU, CPU)), cpu_job), PlacedJob)
    # Clients on the CPU, the server's parameters elsewhere: uplinks must go back there.
    remote = attrs.evolve(cpu_job, downlink=to_device(cpu_job.downlink, torch.device("meta")))
    job = placed(Placement((CPU,)), remote)
    assert isinstance(job, PlacedJob)
    assert job.server == torch.device("meta")


def test_a_placed_task_carries_its_device() -> None:
    placement = Placement((CPU, CPU))
    seen: list[torch.device] = []

    def update(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
        seen.append(task.device)
        return helpers.pid_update(downlink, data, task)

    job = ClientJob(ClientContext(update, [1.0, 2.0]), _job().downlink)
    placement.job(job)(ClientTask(1, 0, Key.from_seed(0)))
    assert seen == [CPU]


# -- executors with device lists: one digest, data placed once, clients routed -----------------


def _toy(per_round: int = 10) -> Algorithm[float]:
    return Algorithm(
        name="toy",
        init=lambda key: ServerState(params={"w": torch.randn(4, generator=key.torch_generator())}),
        sample=uniform_sampler(10, per_round),
        broadcast=broadcast_params,
        client_update=helpers.noisy_update,
        aggregate=mean_by_examples,
    )


def _digest(executor: Executor, rounds: int = 3) -> str:
    algo = _toy(per_round=6)
    clients = [0.5 * i for i in range(10)]
    state, _ = run_rounds(
        make_round(algo, clients, executor),
        algo.init(Key.from_seed(0)),
        Key.from_seed(1),
        until=rounds,
    )
    return tree.digest(state.params)


DEVICE_FACTORIES: list[tuple[str, Callable[[], Executor]]] = [
    ("sequential-2", lambda: Sequential(devices=["cpu", "cpu"])),
    ("threads-3-on-2", lambda: Threads(3, devices=["cpu", "cpu"])),
    ("threads-2-on-5", lambda: Threads(2, devices=["cpu"] * 5)),
]


@pytest.mark.parametrize(
    ("name", "factory"), DEVICE_FACTORIES, ids=[n for n, _ in DEVICE_FACTORIES]
)
def test_device_lists_give_the_sequential_bits(name: str, factory: Callable[[], Executor]) -> None:
    with Sequential() as reference:
        expected = _digest(reference)
    with factory() as executor:
        assert _digest(executor) == expected, name


def test_threads_place_each_clients_data_once_per_executor_not_per_round() -> None:
    with Threads(2, devices=["cpu", "cpu"]) as executor:
        _digest(executor, rounds=4)
        placements = executor.placements
    assert placements, "no data was placed"
    assert set(placements.values()) == {1}
    assert all(index == client % 2 for client, index in placements)
    with Threads(2) as plain:
        _digest(plain)
        assert plain.placements == {}


def _pids_by_client(executor: Executor) -> dict[int, int]:
    algo = attrs.evolve(_toy(), client_update=helpers.pid_update)
    clients = [0.5 * i for i in range(10)]
    state = algo.init(Key.from_seed(0))
    job = ClientJob(ClientContext(algo.client_update, clients), algo.broadcast(state))
    tasks = [ClientTask(k, 0, Key.from_seed(k)) for k in range(10)]
    uplinks = executor.map(job, tasks)
    return {u.client_id: int(u.metrics["pid"]) for u in uplinks}


@pytest.mark.parametrize(
    ("workers", "devices", "groups"),
    [
        (2, 2, [{0, 2, 4, 6, 8}, {1, 3, 5, 7, 9}]),  # one device each
        (2, 3, [{0, 2, 3, 5, 6, 8, 9}, {1, 4, 7}]),  # worker 0 owns devices 0 and 2
        (3, 2, None),  # device 0 has workers 0 and 2, device 1 has worker 1
    ],
)
def test_processes_run_each_client_on_a_worker_that_owns_its_device_with_sequential_bits(
    workers: int, devices: int, groups: list[set[int]] | None
) -> None:
    with Sequential() as reference:
        expected = _digest(reference)
    with Processes(workers, devices=["cpu"] * devices) as executor:
        assert _digest(executor) == expected
        pids = _pids_by_client(executor)
    served = {pid: {k for k, p in pids.items() if p == pid} for pid in set(pids.values())}
    if groups is not None:
        assert sorted(served.values(), key=min) == groups
    else:
        odd = {pids[k] for k in range(1, 10, 2)}
        even = {pids[k] for k in range(0, 10, 2)}
        assert len(odd) == 1  # device 1's one worker
        assert not odd & even  # never runs device 0's clients


# -- determinism switches ------------------------------------------------------------------


@pytest.fixture
def restore_cublas() -> Iterator[None]:
    before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    if before is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before


@pytest.mark.usefixtures("restore_cublas")
def test_cuda_determinism_switches_on_inside_and_restores_after() -> None:
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":0:0"  # not a deterministic setting
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    inside: list[tuple[bool, bool, bool, str]] = []

    def work() -> None:
        with cuda_determinism():
            inside.append(
                (
                    torch.are_deterministic_algorithms_enabled(),
                    torch.backends.cudnn.deterministic,
                    torch.backends.cudnn.benchmark,
                    os.environ["CUBLAS_WORKSPACE_CONFIG"],
                )
            )
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        work()
    assert inside == [(True, True, False, ":4096:8")]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    with cuda_determinism(enabled=False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]


@pytest.mark.usefixtures("restore_cublas")
def test_a_users_deterministic_cublas_setting_is_kept() -> None:
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    with cuda_determinism():
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


# -- the hot path: loss read once per client, same bits as before -----------------------------


def test_local_loss_is_summed_on_the_device_with_the_bits_of_a_python_float_sum() -> None:
    factory = functools.partial(logistic_regression, (5,), 3)
    template = build_module(factory, Key.from_seed(0))
    params = {n: t.detach() for n, t in template.state_dict().items()}
    base = TensorDataset(torch.randn(37, 5, generator=torch.Generator().manual_seed(1)),
                         torch.arange(37) % 3)  # fmt: skip
    data = ClientData(base, torch.arange(37))
    config = LocalSGD(epochs=2, batch_size=8, lr=0.1)
    _, metrics = train_local(template, params, data, Key.from_seed(3), config)
    # The pre-device formula: one float() per batch, summed as Python floats.
    module = build_module(factory, Key.from_seed(0))
    module.load_state_dict(params)
    generator = Key.from_seed(3).torch_generator()
    total, seen = 0.0, 0
    for _ in range(2):
        for x, y in data.batches(8, generator):
            loss = torch.nn.functional.cross_entropy(module(x), y)
            loss.backward()  # pyright: ignore[reportUnknownMemberType]
            with torch.no_grad():
                for p in module.parameters():
                    assert p.grad is not None
                    p.add_(p.grad, alpha=-0.1)
                    p.grad = None
            total += float(loss.detach()) * int(y.shape[0])
            seen += int(y.shape[0])
    assert metrics["loss"] == total / seen


# -- the run config and the CLI ----------------------------------------------------------------


def test_on_server_keeps_an_algorithm_already_on_its_device() -> None:
    algo = _toy()
    assert on_server(algo, CPU) is algo


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a not in DISTILLATION])
def test_every_averaging_algorithm_gives_one_digest_on_a_device_list(algorithm: str) -> None:
    base = RunConfig(algorithm=algorithm, clients=8, clients_per_round=6, rounds=2, batch_size=5)
    plain = simulate(base).params_sha256
    spread = attrs.evolve(base, executor="threads", workers=2, device="cpu,cpu,cpu")
    assert simulate(spread).params_sha256 == plain


@pytest.mark.parametrize("field", ["device", "server_device"])
def test_run_config_refuses_devices_this_machine_lacks(field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: malformed device"):
        RunConfig(**{field: "gpu"})
    with pytest.raises(TypeError, match=f"{field} must be a str"):
        RunConfig(**{field: 0})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--device", "cpu,,cpu"), "malformed device list 'cpu,,cpu'"),
        (("--device", "tpu:0"), "malformed device 'tpu:0'"),
        (("--server-device", "cpu,cpu"), "malformed device 'cpu,cpu'"),
        pytest.param(("--device", "cuda"), "needs CUDA", marks=no_cuda, id="cuda-without-cuda"),
        pytest.param(
            ("--server-device", "cuda:1"), "needs CUDA", marks=no_cuda, id="server-without-cuda"
        ),
    ],
)
def test_cli_bad_devices_exit_2_with_one_line(
    flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--quiet", "--rounds", "1", *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("blazefl-fn: error: ")
    assert message in lines[0]
    assert "available: cpu" in lines[0]
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means the GPUs there")
def test_cli_device_auto_without_a_gpu_runs_on_the_cpu_with_the_same_bits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def run(*flags: str) -> dict[str, object]:
        assert main(["run", "--quiet", "--json", "--rounds", "2", *flags]) == 0
        result: dict[str, object] = json.loads(capsys.readouterr().out)
        return result

    auto, plain = run("--device", "auto"), run()
    # Stored as what it resolved to, so that a resume is checked against the real devices.
    assert auto["device"] == plain["device"] == "cpu"
    assert auto["params_sha256"] == plain["params_sha256"]


@pytest.mark.parametrize(("field", "value"), [("device", "cpu,cpu"), ("server_device", "cpu:0")])
def test_a_resume_on_other_devices_is_refused_by_name(field: str, value: str) -> None:
    # GPU bits differ from CPU bits: a resumed run must use the devices that began it.
    with pytest.raises(ValueError, match=f"{field}='cpu'"):
        check_resumable(RunConfig(), RunConfig(**{field: value}))


def test_the_broadcast_is_placed_once_per_round_and_device_not_per_client() -> None:
    # The meta device stands in for a GPU: placement makes real new tensors there.
    meta = torch.device("meta")
    placement = Placement((meta, meta))
    first = placement.job(_job())
    on_0 = first.device_job(0)
    assert on_0.downlink.params["w"].device == meta
    assert first.device_job(0) is on_0  # every client of device 0 shares it this round
    assert first.device_job(1).downlink.params["w"] is not on_0.downlink.params["w"]
    # The next round places its own broadcast; the clients' context is placed once.
    second = placement.job(_job())
    assert second.device_job(0).downlink is not on_0.downlink
    assert second.device_job(0).context is on_0.context


def test_a_device_named_twice_holds_one_copy_of_the_client_update() -> None:
    meta = torch.device("meta")
    placement = Placement((meta, meta))
    context = ClientContext(_Record(torch.ones(2), {}), SIX)
    first, second = placement.context(context, 0), placement.context(context, 1)
    assert first.client_update is second.client_update
    assert first.client_update.weights.device == meta
    assert first.clients is not second.clients  # each index places its own clients


@pytest.mark.parametrize("sticky", [False, True])
def test_task_queues_give_a_worker_only_its_devices_clients_in_task_order(sticky: bool) -> None:
    from blazefl_fn.executors._placement import TaskQueues

    tasks = [ClientTask(k, 0, Key.from_seed(k)) for k in (5, 0, 7, 2, 9, 4, 11)]
    queues = TaskQueues(tasks, 3, 2, sticky)  # 3 workers share 2 devices
    taken: dict[int, list[int]] = {w: [] for w in range(3)}
    for worker in (0, 1, 2) * len(tasks):
        index = queues.take(worker)
        if index is not None:
            taken[worker].append(index)
    assert sorted(i for got in taken.values() for i in got) == list(range(len(tasks)))
    for worker, got in taken.items():
        assert got == sorted(got)
        for index in got:
            client = tasks[index].client_id
            assert client % 2 in owned_groups(worker, 3, 2)
            if sticky:
                assert worker == worker_for(client, 3, 2)
