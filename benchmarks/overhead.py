"""Where one small client's time goes: W0's client update part by part, the round machinery and
each executor's trip, in microseconds per client.

    python -m benchmarks.overhead            # 300 clients timed, W0's shape (~1 min on 2 cores)
    python -m benchmarks.overhead --clients 100

W0's shape: CIFAR-10-shaped clients of 50 random examples, the small CNN, one local step of
batch 50 (lr 0.1). The client update is taken apart into the calls
`blazefl_fn.client.training.train`
and `blazefl_fn.executors.jobs.ClientJob` make, each timed with the thread's CPU clock (a shared
machine's
other load does not count) and reported as the median over the clients. They are timed inside
the loop, so each part pays the cold caches a real round leaves it after the previous client's
step. The round machinery (client keys and tasks, the non-finite screen, the float64 weighted
mean) runs once over 1000 uplinks. The executor trip is wall time per client of a map of 1000
trivial updates that return a W0-sized uplink (what a client costs an executor besides its
work).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import attrs
import torch
from torch.nn import functional as F

import blazefl_fn as fl
from blazefl_fn import round as rnd
from blazefl_fn.client import _module_copy as mc
from blazefl_fn.client.stochastic import keyed_rng
from blazefl_fn.data import ClientData, TensorDataset
from blazefl_fn.executors.jobs import ClientContext, ClientJob, _rng_changed, _rng_states
from blazefl_fn.models import cnn
from blazefl_fn.records import ClientTask, Downlink, Uplink

__all__ = ["EXAMPLES", "main", "w0_clients", "w0_fedavg", "w0_tensors"]

EXAMPLES = 50


def trivial(downlink: Downlink, data: ClientData, task: ClientTask) -> Uplink:
    """Returns a copy of the downlink's parameters: an executor's trip with no work."""
    params = {k: v.clone() for k, v in downlink.params.items()}
    return Uplink(task.client_id, len(data), params, metrics={"loss": 1.0})


def w0_tensors(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` W0 clients' examples, client ``i`` at rows ``i * EXAMPLES`` onwards."""
    generator = fl.Key.from_seed(0).fold_in("data").torch_generator()
    x = torch.randn(count * EXAMPLES, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (count * EXAMPLES,), generator=generator)
    return x, y


def w0_clients(x: torch.Tensor, y: torch.Tensor) -> tuple[ClientData, ...]:
    """The clients of `w0_tensors`' examples, as views of one data set."""
    base = TensorDataset(x, y)
    return tuple(
        ClientData(base, torch.arange(i * EXAMPLES, (i + 1) * EXAMPLES))
        for i in range(len(y) // EXAMPLES)
    )


def w0_fedavg(clients: int) -> fl.Algorithm[ClientData]:
    """W0's FedAvg: the small CNN, every client each round, one step of batch EXAMPLES."""
    return fl.fedavg(
        functools.partial(cnn, (3, 32, 32), 10), num_clients=clients,
        clients_per_round=clients, local=fl.LocalSGD(batch_size=EXAMPLES, lr=0.1),
    )  # fmt: skip


def _parts(clients: tuple[ClientData, ...]) -> tuple[dict[str, list[float]], list[Uplink]]:
    """Each part of every client's update, in thread-CPU microseconds."""
    algorithm = w0_fedavg(len(clients))
    template = algorithm.client_update.template  # pyright: ignore[reportFunctionMemberAccess]
    params = algorithm.init(fl.Key.from_seed(1)).params
    round_key = fl.Key.from_seed(2).fold_in(0)
    times: dict[str, list[float]] = {}

    def lap(name: str, start: int) -> int:
        now = time.thread_time_ns()
        times.setdefault(name, []).append((now - start) / 1e3)
        return now

    uplinks: list[Uplink] = []
    for cid, data in enumerate(clients):
        task = ClientTask(cid, 0, round_key.fold_in(cid))
        t = time.thread_time_ns()
        before = _rng_states(task.device)
        t = lap("global-RNG guard: state before", t)
        module = mc.load_params(template, params)
        t = lap("load parameters into the working copy", t)
        mc.train_mode(module)
        t = lap("train mode", t)
        trainable = [p for _, p in mc.trainable(module)]
        t = lap("trainable parameter list", t)
        generator = task.key.torch_generator()
        t = lap("generator (128-bit mt19937 state)", t)
        dropout = keyed_rng(task.key.fold_in("dropout"))
        dropout.__enter__()
        t = lap("dropout key + keyed_rng", t)
        total: torch.Tensor | float | None = None
        for x, y in data.batches(EXAMPLES, generator):
            t = lap("batch gather (randperm + index)", t)
            loss = F.cross_entropy(module(x), y)
            loss.backward()  # pyright: ignore[reportUnknownMemberType]
            mc.sgd_step(trainable, 0.1)
            t = lap("the step (forward, backward, SGD)", t)
            total = mc.accumulate(total, loss, int(y.shape[0]))
            t = lap("loss sum", t)
        dropout.__exit__(None, None, None)
        mean = mc.mean_loss(total, len(data))
        t = lap("loss read", t)
        trained = mc.state_of(module)
        t = lap("uplink parameters (copies)", t)
        uplink = Uplink(cid, len(data), trained, metrics={"loss": mean})
        t = lap("Uplink record", t)
        _rng_changed(before, task.device)
        lap("global-RNG guard: state after + compare", t)
        uplinks.append(uplink)
    return times, uplinks


def _per_client(run: Callable[[], object], clients: int, clock: Callable[[], float]) -> float:
    spans: list[float] = []
    for _ in range(3):
        start = clock()
        run()
        spans.append(clock() - start)
    return statistics.median(spans) * 1e6 / clients


def main(argv: list[str] | None = None) -> None:
    """Print the three tables (markdown)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead")
    parser.add_argument("--clients", type=int, default=300, help="clients timed part by part")
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    torch.set_num_threads(1)
    clients = w0_clients(*w0_tensors(args.clients))
    times, uplinks = _parts(clients)
    # Inside the loop each part runs cache-cold after the previous client's step: 3-8x what
    # it costs alone on a quiet thread, and what a round pays.
    print(
        f"| part of one client's update (median of {args.clients}, timed in the loop) "
        "| thread CPU µs |"
    )
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} |")
    around = sum(
        statistics.median(v) for k, v in times.items() if "step" not in k and "gather" not in k
    )
    print(f"| **around the step and the gather (sum)** | **{around:.1f}** |")

    many = [
        attrs.evolve(u, client_id=i) for i, u in enumerate(uplinks * (1000 // len(uplinks) + 1))
    ]
    many = many[:1000]
    algorithm = w0_fedavg(1000)
    state = fl.ServerState(params=uplinks[0].params)
    key = fl.Key.from_seed(2).fold_in(0)
    cpu = time.thread_time
    print("\n| round machinery, 1000 clients | thread CPU µs per client |")
    print("|---|---:|")
    machinery: dict[str, Callable[[], object]] = {
        "sampling": lambda: algorithm.sample(state, key.fold_in("sample")),
        "client keys + tasks": lambda: [ClientTask(c, 0, key.fold_in(c)) for c in range(1000)],
        "non-finite screen of the uplinks": lambda: rnd._screen(algorithm, many, 0),  # pyright: ignore[reportPrivateUsage]
        "aggregation (float64 weighted mean)": lambda: algorithm.aggregate(state, many),
    }
    for name, run in machinery.items():
        print(f"| {name} | {_per_client(run, 1000, cpu):.1f} |")

    job = ClientJob(ClientContext(trivial, clients), Downlink(round=0, params=state.params))
    tasks = [ClientTask(c % len(clients), 0, key.fold_in(c)) for c in range(1000)]
    print("\n| executor trip (trivial update, W0-sized uplink) | wall µs per client |")
    print("|---|---:|")
    factories: dict[str, Callable[[], fl.Executor]] = {
        "Sequential()": fl.Sequential,
        "Threads(2)": lambda: fl.Threads(2),
        "Processes(2)": lambda: fl.Processes(2),
    }
    for name, factory in factories.items():
        with factory() as executor:
            if isinstance(executor, fl.Processes):
                executor.prepare(job.context)
            executor.map(job, tasks[:50])

            def run(ex: fl.Executor = executor) -> object:
                return ex.map(job, tasks)

            print(f"| {name} | {_per_client(run, 1000, time.perf_counter):.1f} |")


if __name__ == "__main__":
    main()
