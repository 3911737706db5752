"""CUDA: one digest across executors, data placed once, memory released, determinism enforced.

Every test here needs a GPU and skips without one (CI has none); `benchmarks/gpu_check.py`
runs the timed check. The CPU side of the same machinery is in tests/test_devices.py.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable

import _executor_helpers as helpers
import attrs
import pytest
import torch
from _training import train_local

from blazefl_fn import keys as streams
from blazefl_fn.client.stochastic import KeyedDropout, keyed_rng
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.errors import ClientError
from blazefl_fn.executors import Executor, Processes, Sequential, Threads
from blazefl_fn.executors.jobs import ClientContext, ClientJob
from blazefl_fn.keys import Key
from blazefl_fn.models import build_module, cnn
from blazefl_fn.records import ClientTask, Downlink, Uplink
from blazefl_fn.run.config import ALGORITHMS, DISTILLATION, RunConfig
from blazefl_fn.run.simulate import simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda", 0)
BASE = RunConfig(clients=8, clients_per_round=6, rounds=2, batch_size=5)


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a not in DISTILLATION])
def test_every_executor_gives_one_gpu_digest(algorithm: str) -> None:
    base = attrs.evolve(BASE, algorithm=algorithm, device="cuda")
    digests = {
        (executor, workers): simulate(
            attrs.evolve(base, executor=executor, workers=workers)
        ).params_sha256
        for executor, workers in (("sequential", 1), ("threads", 2), ("threads", 3),
                                  ("processes", 2))
    }  # fmt: skip
    assert len(set(digests.values())) == 1, digests
    # Repeated: the same bits on every run.
    assert simulate(base).params_sha256 == digests["sequential", 1]


@pytest.mark.parametrize("clients_on", ["cuda", "cpu"])
@pytest.mark.parametrize("executor", ["sequential", "threads", "processes"])
def test_the_server_on_the_gpu_runs_every_averaging_algorithm(
    clients_on: str, executor: str
) -> None:
    for algorithm in (a for a in ALGORITHMS if a not in DISTILLATION):
        config = attrs.evolve(
            BASE, algorithm=algorithm, device=clients_on, server_device="cuda", executor=executor
        )
        first, second = simulate(config), simulate(config)
        assert first.params_sha256 == second.params_sha256, algorithm
        assert first.state.params[next(iter(first.state.params))].device == CUDA


def test_gpu_bits_differ_from_cpu_bits_only_through_arithmetic() -> None:
    # Not a promise of equality: the same batches on both, so the results stay close.
    cpu = simulate(BASE)
    gpu = simulate(attrs.evolve(BASE, device="cuda"))
    for name, value in cpu.state.params.items():
        assert torch.allclose(value, gpu.state.params[name].cpu(), atol=1e-4), name


def _job(clients: list[float]) -> ClientJob[float]:
    downlink = Downlink(round=0, params={"w": torch.zeros(4)})
    return ClientJob(ClientContext(helpers.pid_update, clients), downlink)


@pytest.mark.parametrize(
    "factory",
    [lambda: Sequential("cuda"), lambda: Threads(2, devices=["cuda"]),
     lambda: Processes(2, devices=["cuda"])],
    ids=["sequential", "threads", "processes"],
)  # fmt: skip
def test_clients_run_on_the_gpu_and_uplinks_come_back_to_the_cpu(
    factory: Callable[[], Executor],
) -> None:
    clients = [0.5 * i for i in range(6)]
    with factory() as executor:
        uplinks = executor.map(
            _job(clients), [ClientTask(k, 0, Key.from_seed(k)) for k in range(6)]
        )
    assert all(u.metrics["cuda"] == 1.0 for u in uplinks)
    assert all(t.device.type == "cpu" for u in uplinks for t in u.params.values())


def test_data_moves_once_and_memory_is_released_on_close() -> None:
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    clients = [0.5 * i for i in range(6)]
    with Threads(2, devices=["cuda"]) as executor:
        for round_index in range(3):
            job = ClientJob(_job(clients).context, _job(clients).downlink)
            executor.map(job, [ClientTask(k, round_index, Key.from_seed(k)) for k in range(6)])
        assert set(executor.placements.values()) == {1}
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start


def test_local_training_reads_the_loss_once_per_client_not_per_step() -> None:
    template = build_module(lambda: cnn((3, 32, 32), 10), Key.from_seed(0)).to(CUDA)
    params = {n: t.detach() for n, t in template.state_dict().items()}
    base = TensorDataset(torch.randn(200, 3, 32, 32), torch.arange(200) % 10)
    data = ClientData(base, torch.arange(200)).gathered(CUDA)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_local(template, params, data, Key.from_seed(1), LocalSGD(batch_size=10))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) < 20 // 2, [str(w.message) for w in syncs]  # 20 steps


def _nondeterministic(downlink: Downlink, data: float, task: ClientTask) -> Uplink:
    # histc has no deterministic CUDA kernel: under the executor's settings it must raise.
    counts = torch.histc(downlink.params["w"].repeat(100), bins=4)
    return Uplink(task.client_id, 1, {"w": counts})


def test_an_op_without_a_deterministic_cuda_kernel_is_an_error_naming_it() -> None:
    with Sequential("cuda") as executor:
        job = ClientJob(ClientContext(_nondeterministic, [1.0]), Downlink(0, {"w": torch.ones(4)}))
        with pytest.raises(ClientError, match="histc") as info:
            executor.map(job, [ClientTask(0, 0, Key.from_seed(0))])
    assert "deterministic" in str(info.value)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the map


def test_gpu_memory_left_after_a_run_does_not_grow_with_its_rounds() -> None:
    config = attrs.evolve(BASE, rounds=1, device="cuda", executor="threads", workers=2)
    simulate(config)  # warm up: caches, cuBLAS workspaces
    torch.cuda.synchronize()
    after_one = torch.cuda.memory_allocated()
    simulate(attrs.evolve(config, rounds=6))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == after_one


LOCAL_SGD = [a for a in ALGORITHMS if a not in DISTILLATION]


@pytest.mark.parametrize("server", ["cpu", "cuda"])
def test_vectorized_on_the_gpu_repeats_its_bits_and_stays_near_sequential(server: str) -> None:
    for algorithm in LOCAL_SGD:
        base = attrs.evolve(BASE, algorithm=algorithm, device="cuda", server_device=server)
        vectorized = attrs.evolve(base, executor="vectorized", chunk=4)
        first, second = simulate(vectorized), simulate(vectorized)
        assert first.params_sha256 == second.params_sha256, algorithm
        reference = simulate(base).state.params
        diff = max(
            float((first.state.params[n].cpu() - reference[n].cpu()).abs().max()) for n in reference
        )
        assert diff < 1e-4, (algorithm, diff)


def test_vectorized_places_data_once_syncs_rarely_and_releases_memory() -> None:
    from blazefl_fn.algorithms.fedavg import fedavg
    from blazefl_fn.executors import Vectorized
    from blazefl_fn.round import make_round

    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    base = TensorDataset(torch.randn(6 * 40, 3, 32, 32), torch.arange(6 * 40) % 10)
    clients = [ClientData(base, torch.arange(i * 40, (i + 1) * 40)) for i in range(6)]
    algorithm = fedavg(
        lambda: cnn((3, 32, 32), 10), num_clients=6, clients_per_round=6,
        local=LocalSGD(batch_size=10),
    )  # fmt: skip
    key = Key.from_seed(0)
    state = algorithm.init(key)
    with Vectorized(chunk=3, device="cuda") as executor:
        round_fn = make_round(algorithm, clients, executor)
        state, _ = round_fn(state, key.fold_in(0))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state, _ = round_fn(state, key.fold_in(1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert set(executor.placements.values()) == {1}
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) < 4 * 2, [str(w.message) for w in syncs]  # 4 steps per chunk
    del state, round_fn
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start


def test_vectorized_refuses_a_chunk_over_the_free_gpu_memory() -> None:
    from blazefl_fn.executors import Vectorized

    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match="bytes free; pass a smaller chunk"):
        Vectorized(chunk=2, device="cuda").chunk_size(free, 2)


def test_a_portable_run_refuses_cuda_devices() -> None:
    with pytest.raises(ValueError, match="pin CPU kernels only"):
        RunConfig(portable=True, device="cuda")
    with pytest.raises(ValueError, match="pin CPU kernels only"):
        RunConfig(portable=True, server_device="cuda")


def _cuda_draws(key: Key) -> list[torch.Tensor]:
    with keyed_rng(key):
        mask = KeyedDropout(0.5)(torch.ones(64, device=CUDA)) != 0
    return [
        torch.rand(16, device=CUDA, generator=key.torch_generator(CUDA)),
        torch.randperm(64, device=CUDA, generator=key.torch_generator(CUDA)),
        mask,
    ]


def test_cuda_streams_depend_on_every_bit_of_the_key() -> None:
    key = Key.from_seed(2026)
    generator = key.torch_generator(CUDA)
    assert (generator.initial_seed(), generator.get_offset()) == streams.philox_seed_offset(
        key.bits
    )
    ours = _cuda_draws(key)
    assert all(
        torch.equal(a, b) for a, b in zip(ours, _cuda_draws(Key(bytes(key.bits))), strict=True)
    )
    for bit in range(128):
        value = int.from_bytes(key.bits, "little") ^ (1 << bit)
        theirs = _cuda_draws(Key(value.to_bytes(16, "little")))
        assert all(not torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), bit


_CUDA_FACTORY = """
import sys, torch
from blazefl_fn.keys import Key
from blazefl_fn.models import build_module
assert not torch.cuda.is_initialized()
key = Key(bytes.fromhex(sys.argv[1]))
module = build_module(lambda: torch.nn.Linear(4, 4, device="cuda"), key)
print(module.weight.sum().item().hex())
"""


def test_a_factory_that_initialises_cuda_draws_from_the_key() -> None:
    def weights(key: Key) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _CUDA_FACTORY, key.bits.hex()],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    key = Key.from_seed(5)
    high_bit = Key(key.bits[:15] + bytes([key.bits[15] ^ 0x80]))
    assert weights(key) == weights(key)
    assert weights(key) != weights(high_bit)
