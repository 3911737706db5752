"""Buffers are not parameters: clipping and server optimizers act on trainable parameters only,
and BatchNorm statistics are the example-weighted mean of the clients' (unless asked otherwise)."""

from __future__ import annotations

import functools

import attrs
import pytest
import torch
from torch import nn

import blazefl_fn as fl
from blazefl_fn import tree
from blazefl_fn.algorithms.compose import Aggregate, compose
from blazefl_fn.models import logistic_regression
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import load_federation
from blazefl_fn.server.optim import adam

KEY = fl.Key.from_seed(0)


def bn_net(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes)
    )


MODEL_FN = functools.partial(bn_net, (4,), 3)
TRAINABLE = fl.trainable_names(fl.build_template(MODEL_FN))
BUFFERS = ("2.running_mean", "2.running_var", "2.num_batches_tracked")


def _state() -> fl.ServerState:
    return fl.ServerState(tree.from_module(fl.build_module(MODEL_FN, KEY)))


def _client(
    state: fl.ServerState, cid: int, param_shift: float, stat_shift: float, n: int
) -> fl.Uplink:
    params = {
        name: (
            t + param_shift
            if name in TRAINABLE
            else t + stat_shift
            if t.is_floating_point()
            else t + 10 * (cid + 1)
        )
        for name, t in state.params.items()
    }
    return fl.Uplink(cid, n, params)


def test_clipping_ignores_running_statistics_by_default() -> None:
    state = _state()
    # A tiny parameter update but a huge change of the running statistics (as after a few
    # batches of differently scaled data): only the parameters may be clipped.
    uplinks = [_client(state, 0, 1e-3, 50.0, 10)]
    size = sum(t.numel() for n, t in state.params.items() if n in TRAINABLE)
    param_norm = 1e-3 * size**0.5
    policy = Aggregate(clip_norm=1.0, trainable=TRAINABLE)
    new = policy(state, uplinks)
    for name in TRAINABLE:  # under the clip norm: unchanged by clipping
        assert torch.allclose(new.params[name], uplinks[0].params[name], atol=1e-7)
    assert param_norm < 1.0
    for name in BUFFERS:  # buffers: the (one) client's
        assert torch.equal(new.params[name], uplinks[0].params[name])
    old = Aggregate(clip_norm=1.0, trainable=TRAINABLE, buffers="with_params")(state, uplinks)
    # Counting the statistics in the norm, the whole update (parameters too) shrinks.
    moved = [float((old.params[n] - state.params[n]).abs().max()) for n in TRAINABLE]
    assert max(moved) < 0.5e-3


def test_buffers_are_the_weighted_mean_and_counters_round() -> None:
    state = _state()
    uplinks = [_client(state, 0, 0.1, 1.0, 30), _client(state, 1, 0.1, 5.0, 10)]
    new = Aggregate(trainable=TRAINABLE)(state, uplinks)
    mean_shift = (30 * 1.0 + 10 * 5.0) / 40
    assert torch.allclose(new.params["2.running_mean"], state.params["2.running_mean"] + mean_shift)
    counter = new.params["2.num_batches_tracked"]
    assert counter.dtype == torch.int64
    assert int(counter) == round((30 * 10 + 10 * 20) / 40)


def test_a_robust_aggregator_stays_robust_for_the_statistics() -> None:
    state = _state()
    honest = [_client(state, i, 0.1, 1.0, 10) for i in range(4)]
    attacker = _client(state, 4, 0.1, 1e6, 10)
    new = Aggregate(aggregator=fl.server.aggregators.median, trainable=TRAINABLE)(
        state, [*honest, attacker]
    )
    assert torch.allclose(new.params["2.running_var"], state.params["2.running_var"] + 1.0)
    averaged = Aggregate(trainable=TRAINABLE)(state, [*honest, attacker])
    assert float(averaged.params["2.running_var"].min()) > 1e5  # the mean is not robust


def test_fedadam_steps_parameters_only_and_keeps_no_moments_for_buffers() -> None:
    config = RunConfig(clients=6, clients_per_round=3)
    data = load_federation(config, KEY.fold_in("data"))
    model_fn = functools.partial(bn_net, data.input_shape, data.num_classes)
    local = fl.LocalSGD(batch_size=8, lr=0.05)
    algo = fl.fedadam(model_fn, num_clients=6, clients_per_round=3, local=local, server_lr=0.1)
    state = algo.init(KEY)
    moments = state.aux
    assert attrs.has(type(moments))
    trees = [v for v in attrs.asdict(moments, recurse=False).values() if isinstance(v, dict)]
    assert len(trees) == 2  # m and v, over the trainable parameters only
    for moment in trees:
        assert set(moment) == set(fl.trainable_names(fl.build_template(model_fn)))
    with fl.Sequential() as ex:
        round_fn = fl.make_round(algo, data.clients, ex)
        new, _ = round_fn(state, KEY)
        uplinks_state = algo.init(KEY)
    # Running statistics move to the clients' weighted mean, not by an Adam step of 0.1.
    assert not torch.equal(new.params["2.running_var"], uplinks_state.params["2.running_var"])
    assert int(new.params["2.num_batches_tracked"]) > 0
    old = compose(
        "fedadam-with-buffers", model_fn, num_clients=6, clients_per_round=3, local=local,
        aggregate=Aggregate(server=adam(0.1), buffers="with_params"),
    )  # fmt: skip
    with fl.Sequential() as ex:
        old_new, _ = fl.make_round(old, data.clients, ex)(old.init(KEY), KEY)
    # Treated as a parameter, the counter takes an Adam step: a float value rounded back.
    assert not torch.equal(old_new.params["2.running_var"], new.params["2.running_var"])


def test_a_model_without_buffers_aggregates_as_before() -> None:
    """Same bits as the pre-policy arithmetic when every entry is trainable."""
    config = RunConfig(clients=6, clients_per_round=3)
    data = load_federation(config, KEY.fold_in("data"))
    model_fn = functools.partial(logistic_regression, data.input_shape, data.num_classes)
    local = fl.LocalSGD(batch_size=8, lr=0.05)
    digests = []
    for buffers in ("aggregate", "with_params"):
        algo = compose(
            "x", model_fn, num_clients=6, clients_per_round=3, local=local,
            aggregate=Aggregate(server=adam(0.1), clip_norm=0.5, buffers=buffers),
        )  # fmt: skip
        with fl.Sequential() as ex:
            state, _ = fl.run_rounds(
                fl.make_round(algo, data.clients, ex), algo.init(KEY), KEY, until=2
            )
        digests.append(tree.digest(state.params))
    assert digests[0] == digests[1]


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="'buffers' must be in"):
        Aggregate(buffers="median")  # type: ignore[arg-type]
