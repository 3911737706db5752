"""Write your own stateful algorithm from public stages: SCAFFOLD in one page of user code.

Everything here comes from the public API (``blazefl_fn``, ``blazefl_fn.client.optim``,
``blazefl_fn.server.client_state``, ``blazefl_fn.tree``); ``make typecheck`` checks this file with
pyright strict. It runs this SCAFFOLD and the shipped ``fl.scaffold`` on Synthetic(1, 1) with
the same key and prints both digests: they are the same bits.

    python examples/scaffold_from_stages.py --rounds 20
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from typing import TypeVar

import attrs
import torch

import blazefl_fn as fl
from blazefl_fn import tree
from blazefl_fn.client import optim as client_optim
from blazefl_fn.data import synthetic
from blazefl_fn.models import logistic_regression
from blazefl_fn.server import client_state


@attrs.frozen(eq=False)
class Variates:
    """The server's own state: its control variate and every client's."""

    c: tree.Params
    clients: client_state.ClientStates


State = fl.ServerState[Variates]
A = TypeVar("A")


def zeros(params: tree.Params) -> dict[str, torch.Tensor]:
    return tree.map_params(torch.zeros_like, params)


@attrs.frozen
class Init:
    model_fn: fl.ModelFactory
    num_clients: int

    def __call__(self, key: fl.Key) -> State:
        params = tree.from_module(fl.build_module(self.model_fn, key))
        names = fl.trainable_names(self.model_fn(), aliases=True)
        c = zeros(tree.select(params, names))
        return fl.ServerState(
            params, aux=Variates(c, client_state.initial_states(self.num_clients))
        )


def broadcast(state: State) -> fl.Downlink:
    # The model and the server variate travel together: two named trees in one message.
    return fl.Downlink(state.round, tree.pack({"model": state.params, "c": state.aux.c}))


def dispatch(state: State, ids: Sequence[int]) -> list[fl.ClientInput]:
    return client_state.dispatch_states(state.aux.clients, ids)


@attrs.frozen
class ClientUpdate:
    template: torch.nn.Module
    training: fl.LocalTraining

    def __call__(
        self, downlink: fl.Downlink, data: fl.ClientData, task: fl.ClientTask
    ) -> fl.Uplink:
        x, c = tree.unpack(downlink.params, "model"), tree.unpack(downlink.params, "c")
        c_i = task.state if task.state else zeros(c)
        out = fl.train(self.template, x, data, task.key, self.training, trees={"c": c, "c_i": c_i})
        steps = out.result.steps
        c_new = dict(c_i)
        if steps:
            c_new = {
                n: c_i[n] - c[n] + (x[n] - out.params[n]) / (steps * self.training.lr) for n in c
            }
        return fl.Uplink(
            task.client_id,
            len(data),
            tree.pack({"model": out.params, "c_delta": tree.sub(c_new, c_i)}),
            metrics={"loss": out.result.loss},
            state=c_new,
            steps=steps,
        )


@attrs.frozen
class Aggregate:
    num_clients: int

    def __call__(self, state: State, uplinks: Sequence[fl.Uplink]) -> State:
        m, c = len(uplinks), state.aux.c
        x = tree.select(state.params, list(c))
        moved = [tree.sub(tree.select(tree.unpack(u.params, "model"), list(c)), x) for u in uplinks]
        new_x = tree.add_weighted(x, moved, [1.0 / m] * m)  # x + mean(y_i - x)
        c_deltas = [tree.unpack(u.params, "c_delta") for u in uplinks]
        new_c = tree.add_weighted(c, c_deltas, [1.0 / self.num_clients] * m)
        params = {**state.params, **new_x}
        clients = client_state.collect_states(state.aux.clients, uplinks)
        return fl.ServerState(params, state.round + 1, Variates(new_c, clients))


def my_scaffold(
    model_fn: fl.ModelFactory, num_clients: int, per_round: int, local: fl.LocalTraining
) -> fl.Algorithm[fl.ClientData, Variates]:
    # Local steps go along g + c - c_i: one stage in front of plain SGD.
    correction = client_optim.add_trees(plus=("c",), minus=("c_i",))
    return fl.Algorithm(
        name="my-scaffold",
        init=Init(model_fn, num_clients),
        sample=fl.uniform_sampler(num_clients, per_round),
        broadcast=broadcast,
        client_update=ClientUpdate(
            fl.build_template(model_fn), attrs.evolve(local, optimizer=correction)
        ),
        aggregate=Aggregate(num_clients),
        dispatch=dispatch,
    )


def run(
    algorithm: fl.Algorithm[fl.ClientData, A],
    clients: Sequence[fl.ClientData],
    executor: fl.Executor,
    run_key: fl.Key,
    rounds: int,
) -> fl.ServerState[A]:
    """``rounds`` rounds of ``algorithm`` from its initial state; pyright tracks ``A``."""
    round_fn = fl.make_round(algorithm, clients, executor)
    state, _ = fl.run_rounds(
        round_fn, algorithm.init(run_key.fold_in("init")), run_key, until=rounds
    )
    return state


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description="SCAFFOLD from public stages.")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    run_key = fl.Key.from_seed(args.seed)
    data = synthetic(1.0, 1.0, num_clients=30, key=run_key.fold_in("data"))
    model_fn = functools.partial(logistic_regression, data.input_shape, data.num_classes)
    local = fl.LocalSGD(lr=0.01)
    mine = my_scaffold(model_fn, 30, 10, local)
    shipped = fl.scaffold(model_fn, num_clients=30, clients_per_round=10, local=local)
    template = fl.build_module(model_fn, run_key.fold_in("template"))
    with fl.Threads(2) as executor:
        finals = {
            "my-scaffold": run(mine, data.clients, executor, run_key, args.rounds).params,
            "fl.scaffold": run(shipped, data.clients, executor, run_key, args.rounds).params,
        }
    digests: dict[str, str] = {}
    for name, params in finals.items():
        accuracy = fl.evaluate(template, params, data.test)["accuracy"]
        digests[name] = tree.digest(params)
        print(f"{name:12s} accuracy {accuracy:.4f}  params_sha256 {digests[name][:16]}")
    return digests


if __name__ == "__main__":
    main()
