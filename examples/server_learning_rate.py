"""Compose your own algorithm from FedAvg's stages: FedAvg with a server learning rate.

Swaps one pure stage (``aggregate``) of FedAvg, runs both on the Synthetic(1, 1) benchmark with
the same key, and prints their test accuracy and digests. With ``--server-lr 1`` the two runs
are bitwise identical.

    python examples/server_learning_rate.py --rounds 30 --server-lr 0.5
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence

import attrs

import blazefl_fn as fl
from blazefl_fn import tree
from blazefl_fn.algorithms import mean_by_examples
from blazefl_fn.data import synthetic
from blazefl_fn.models import logistic_regression

Aggregate = Callable[[fl.ServerState, Sequence[fl.Uplink]], fl.ServerState]


def with_server_lr(server_lr: float) -> Aggregate:
    """An aggregate stage: move the global model ``server_lr`` of the way to the client mean."""

    def aggregate(state: fl.ServerState, uplinks: Sequence[fl.Uplink]) -> fl.ServerState:
        averaged = mean_by_examples(state, uplinks)
        if server_lr == 1.0:
            return averaged
        step = tree.scale(tree.sub(averaged.params, state.params), server_lr)
        return attrs.evolve(averaged, params=tree.add(state.params, step))

    return aggregate


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description="FedAvg with a server learning rate.")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--server-lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    run_key = fl.Key.from_seed(args.seed)
    data = synthetic(1.0, 1.0, num_clients=30, key=run_key.fold_in("data"))
    model_fn = functools.partial(logistic_regression, data.input_shape, data.num_classes)
    base = fl.fedavg(model_fn, num_clients=30, clients_per_round=10, local=fl.LocalSGD())
    variant = attrs.evolve(base, name="fedavg+server-lr", aggregate=with_server_lr(args.server_lr))
    template = fl.build_module(model_fn, run_key.fold_in("template"))

    digests: dict[str, str] = {}
    with fl.Sequential() as executor:
        for algorithm in (base, variant):
            state = algorithm.init(run_key.fold_in("init"))
            round_fn = fl.make_round(algorithm, data.clients, executor)
            state, _ = fl.run_rounds(round_fn, state, run_key, until=args.rounds)
            metrics = fl.evaluate(template, state.params, data.test)
            digests[algorithm.name] = tree.digest(state.params)
            print(
                f"{algorithm.name:<18} accuracy {metrics['accuracy']:.4f}"
                f"  params_sha256 {digests[algorithm.name][:16]}..."
            )
    return digests


if __name__ == "__main__":
    main()
