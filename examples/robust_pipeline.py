"""Compose a robust algorithm and watch it survive attackers that break FedAvg.

A third of the clients are Byzantine: they train honestly, then send the global model plus
-10 times their update. The same run (same key, same attackers) is repeated with three
aggregate stages:

- FedAvg's weighted mean,
- the coordinate-wise median,
- a custom pipeline: clip every update to norm 1, trimmed mean (beta 0.35), server momentum.

    python examples/robust_pipeline.py --rounds 30
"""

from __future__ import annotations

import argparse
import functools

import attrs

import blazefl_fn as fl
from blazefl_fn import tree
from blazefl_fn.algorithms import Aggregate, TrainUpdate, compose
from blazefl_fn.data import ClientData, synthetic
from blazefl_fn.models import logistic_regression
from blazefl_fn.server import aggregators
from blazefl_fn.server import optim as server_optim


@attrs.frozen
class SignFlipAttack:
    """A client stage: clients in ``attackers`` send ``global + factor * honest update``."""

    honest: TrainUpdate
    attackers: frozenset[int]
    factor: float = -10.0

    def __call__(self, downlink: fl.Downlink, data: ClientData, task: fl.ClientTask) -> fl.Uplink:
        uplink = self.honest(downlink, data, task)
        if task.client_id not in self.attackers:
            return uplink
        update = tree.sub(uplink.params, downlink.params)
        forged = tree.add(downlink.params, tree.scale(update, self.factor))
        return attrs.evolve(uplink, params=forged)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Robust aggregation under a sign-flip attack.")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    run_key = fl.Key.from_seed(args.seed)
    data = synthetic(0.0, 0.0, num_clients=30, key=run_key.fold_in("data"))
    model_fn = functools.partial(logistic_regression, data.input_shape, data.num_classes)
    template = fl.build_module(model_fn, run_key.fold_in("template"))
    stages = {
        "mean": Aggregate(),
        "median": Aggregate(aggregator=aggregators.median),
        "clip+trimmed+momentum": Aggregate(
            aggregator=aggregators.trimmed_mean(0.35),
            server=server_optim.momentum(lr=1.0, beta=0.5),
            clip_norm=1.0,
        ),
    }
    accuracy: dict[str, float] = {}
    with fl.Sequential() as executor:
        for name, stage in stages.items():
            honest = compose(
                name, model_fn, num_clients=30, clients_per_round=10,
                local=fl.LocalSGD(lr=0.05), aggregate=stage,
            )  # fmt: skip
            attacked = attrs.evolve(
                honest,
                client_update=SignFlipAttack(
                    honest.client_update,  # pyright: ignore[reportArgumentType]
                    frozenset(range(10)),
                ),
            )
            state = attacked.init(run_key.fold_in("init"))
            round_fn = fl.make_round(attacked, data.clients, executor)
            state, _ = fl.run_rounds(round_fn, state, run_key, until=args.rounds)
            accuracy[name] = fl.evaluate(template, state.params, data.test)["accuracy"]
            print(f"{name:<22} accuracy under attack {accuracy[name]:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
