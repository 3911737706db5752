"""Client-level DP: the noise's law and placement, clipping's bound, the accountant against
Opacus, the budget stop, and one digest across executors and resume."""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazefl_fn.algorithms.compose import Aggregate, compose
from blazefl_fn.algorithms.fedavg import fedavg
from blazefl_fn.algorithms.scaffold import scaffold
from blazefl_fn.client.training import LocalSGD
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.executors import Processes
from blazefl_fn.executors.jobs import VectorizedUpdate
from blazefl_fn.keys import Key
from blazefl_fn.models import logistic_regression
from blazefl_fn.privacy.mechanisms import (
    AdaptiveClipping,
    CentralDP,
    DPState,
    LocalDP,
    LocalNoiseUpdate,
)
from blazefl_fn.privacy.privatize import Accountant, PrivacyBudget, PrivateAggregate, privatize
from blazefl_fn.records import ClientTask, Downlink, ServerState, Uplink
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.metrics_log import MetricsLog, read_metrics
from blazefl_fn.run.simulate import config_dict, config_from_dict, simulate
from blazefl_fn.server.aggregators import clip_by_norm, global_norm
from blazefl_fn.server.sampling import poisson_sampler

opacus_accountants = pytest.importorskip("opacus.accountants")

SMALL = {"clients": 12, "clients_per_round": 4, "rounds": 4}
MODEL = functools.partial(logistic_regression, (6,), 3)


def _normal_cdf(x: float, std: float) -> float:
    return 0.5 * (1.0 + math.erf(x / (std * math.sqrt(2.0))))


def _ks_statistic(values: torch.Tensor, std: float) -> float:
    xs = sorted(values.tolist())
    n = len(xs)
    return max(
        max(abs(_normal_cdf(x, std) - i / n), abs(_normal_cdf(x, std) - (i + 1) / n))
        for i, x in enumerate(xs)
    )


def _private_aggregate(dp: CentralDP, expected: float) -> PrivateAggregate[Any]:
    return PrivateAggregate(Aggregate(), dp, expected)


def _state(params: dict[str, torch.Tensor], clip: float) -> ServerState[DPState[Any]]:
    return ServerState(params=params, aux=DPState(server={}, clip_norm=clip))


def _uplink(cid: int, params: dict[str, torch.Tensor], n: int = 5) -> Uplink:
    return Uplink(client_id=cid, num_examples=n, params=params)


# -- Poisson sampling ---------------------------------------------------------------------------


def test_bernoulli_keeps_exactly_the_words_below_the_threshold() -> None:
    key = Key.from_seed(7)
    words = list(itertools.islice(key.words(), 2000))
    threshold = math.floor(0.37 * 2**64)
    assert key.bernoulli(2000, 0.37) == tuple(i for i, w in enumerate(words) if w < threshold)
    assert key.bernoulli(5, 1.0) == (0, 1, 2, 3, 4)
    assert key.bernoulli(5, 0.0) == ()
    for bad in (-0.1, 1.5, math.nan, True):
        with pytest.raises(ValueError, match="rate must be a number in"):
            key.bernoulli(5, bad)


def test_poisson_sampler_rate_and_refusals() -> None:
    sample = poisson_sampler(1000, 0.05)
    counts = [len(sample(ServerState(params={}), Key.from_seed(0).fold_in(t))) for t in range(200)]
    assert abs(sum(counts) / len(counts) - 50) < 2.5  # mean of 200 rounds: sd ~0.49
    assert len(set(counts)) > 5  # the size varies, unlike fixed-size sampling
    with pytest.raises(ValueError, match=r"rate must be a finite number in \(0, 1\], got 0"):
        poisson_sampler(10, 0)
    with pytest.raises(ValueError, match="num_clients must be an integer"):
        poisson_sampler(0, 0.5)


# -- central DP: the noise ----------------------------------------------------------------------


def test_central_noise_is_gaussian_with_std_z_times_c_over_the_denominator() -> None:
    n = 20000
    params = {"w": torch.zeros(n, dtype=torch.float64)}
    dp = CentralDP(clip_norm=2.0, noise_multiplier=1.5)
    agg = _private_aggregate(dp, expected=1.0)
    out = agg.with_key(_state(params, 2.0), [], Key.from_seed(3))
    noise = out.params["w"]
    assert abs(float(noise.mean())) < 4 * 3.0 / math.sqrt(n)
    assert abs(float(noise.std()) - 3.0) < 0.05
    # Kolmogorov-Smirnov against N(0, 3^2) at the 1% level (critical value 1.628 / sqrt(n)).
    assert _ks_statistic(noise, 3.0) < 1.628 / math.sqrt(n)
    assert out.round == 1


def test_central_noise_is_added_once_to_the_sum_as_the_formula_says() -> None:
    g = torch.Generator().manual_seed(0)
    current = {"w": torch.randn(50, generator=g), "b": torch.randn(3, generator=g)}
    trees = [
        {k: v + torch.randn(v.shape, generator=g) * s for k, v in current.items()}
        for s in (0.1, 1, 5)
    ]
    uplinks = [_uplink(i, t) for i, t in enumerate(trees)]
    dp = CentralDP(clip_norm=1.0, noise_multiplier=0.7)
    key = Key.from_seed(11)
    out = _private_aggregate(dp, expected=4.0).with_key(_state(current, 1.0), uplinks, key)
    # The reference: clip every delta, sum, one noise draw of std z*C, divide by 4.
    gen = key.fold_in("update").numpy_generator()  # Philox over all 128 bits of the key
    noise = {
        n: torch.as_tensor(gen.standard_normal(tuple(current[n].shape))) * 0.7
        for n in sorted(current)
    }
    for name, p in current.items():
        total = sum(
            clip_by_norm({k: t[k].double() - current[k].double() for k in current}, 1.0)[name]
            for t in trees
        )
        expected = (p.double() + (total + noise[name]) / 4.0).float()
        torch.testing.assert_close(out.params[name], expected, rtol=0, atol=1e-6)
    # Noise once per round on the server: its scale does not grow with the clients.
    zeros = {"w": torch.zeros(4000, dtype=torch.float64)}
    same = [_uplink(i, zeros) for i in range(40)]
    spread = _private_aggregate(dp, expected=40.0).with_key(_state(zeros, 1.0), same, key)
    assert abs(float(spread.params["w"].std()) - 0.7 / 40) < 0.7 / 40 * 0.05


def test_a_central_dp_aggregate_refuses_to_run_without_a_key() -> None:
    agg = _private_aggregate(CentralDP(1.0, 1.0), expected=2.0)
    with pytest.raises(TypeError, match="with_key"):
        agg(_state({"w": torch.zeros(2)}, 1.0), [])


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(0.01, 1e4),
    other=st.floats(0.01, 1e4),
    seed=st.integers(0, 2**32 - 1),
)
def test_clipping_bounds_every_clients_contribution(scale: float, other: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    current = {"w": torch.randn(30, generator=gen, dtype=torch.float64)}
    clients = [
        {"w": current["w"] + torch.randn(30, generator=gen, dtype=torch.float64) * scale}
        for _ in range(5)
    ]
    swapped = [
        *clients[:4],
        {"w": current["w"] + torch.randn(30, generator=gen, dtype=torch.float64) * other},
    ]
    dp = CentralDP(clip_norm=0.5, noise_multiplier=0.0)
    agg = _private_aggregate(dp, expected=5.0)
    key = Key.from_seed(seed)
    a = agg.with_key(_state(current, 0.5), [_uplink(i, t) for i, t in enumerate(clients)], key)
    b = agg.with_key(_state(current, 0.5), [_uplink(i, t) for i, t in enumerate(swapped)], key)
    removed = agg.with_key(
        _state(current, 0.5), [_uplink(i, t) for i, t in enumerate(clients[:4])], key
    )
    diff = global_norm({"w": a.params["w"] - b.params["w"]})
    assert diff <= 2 * 0.5 / 5 * (1 + 1e-9)  # replacing one client: at most 2C / m
    assert global_norm({"w": a.params["w"] - removed.params["w"]}) <= 0.5 / 5 * (1 + 1e-9)


def test_adaptive_clipping_follows_andrew_et_al() -> None:
    # z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Thm. 1).
    dp = CentralDP(1.0, 1.0, AdaptiveClipping(quantile=0.5, lr=0.2, count_noise=1.0))
    assert dp.update_noise_multiplier(10.0) == pytest.approx((1 - 0.25) ** -0.5)
    assert CentralDP(1.0, 1.0, AdaptiveClipping()).update_noise_multiplier(100.0) == pytest.approx(
        (1 - 1 / 100) ** -0.5
    )  # sigma_b = 100 / 20 = 5 by default
    with pytest.raises(ValueError, match="2\\*sigma_b > z"):
        CentralDP(1.0, 3.0, AdaptiveClipping(count_noise=1.0)).update_noise_multiplier(10)
    # Every update within C, almost no count noise: C <- C * exp(-lr * (1 - quantile)).
    quiet = CentralDP(2.0, 0.0, AdaptiveClipping(quantile=0.5, lr=0.2, count_noise=1e-9))
    current = {"w": torch.zeros(4)}
    small = [_uplink(i, {"w": torch.full((4,), 0.1)}) for i in range(4)]
    out = _private_aggregate(quiet, 4.0).with_key(_state(current, 2.0), small, Key.from_seed(0))
    assert out.aux.clip_norm == pytest.approx(2.0 * math.exp(-0.2 * 0.5), rel=1e-6)
    big = [_uplink(i, {"w": torch.full((4,), 10.0)}) for i in range(4)]
    out = _private_aggregate(quiet, 4.0).with_key(_state(current, 2.0), big, Key.from_seed(0))
    assert out.aux.clip_norm == pytest.approx(2.0 * math.exp(0.2 * 0.5), rel=1e-6)
    # Fewer clients than expected (Poisson): the count is of b_k - 1/2, shifted back by 1/2:
    # 2 clients within C of 4 expected give (2 - 1) / 4 + 1/2 = 0.75, not 2 / 4.
    out = _private_aggregate(quiet, 4.0).with_key(_state(current, 2.0), small[:2], Key.from_seed(0))
    assert out.aux.clip_norm == pytest.approx(2.0 * math.exp(-0.2 * 0.25), rel=1e-6)
    # More than expected: (6 - 3) / 4 + 1/2 = 1.25, clamped to the fraction 1.
    six = [_uplink(i, {"w": torch.full((4,), 0.1)}) for i in range(6)]
    out = _private_aggregate(quiet, 4.0).with_key(_state(current, 2.0), six, Key.from_seed(0))
    assert out.aux.clip_norm == pytest.approx(2.0 * math.exp(-0.2 * 0.5), rel=1e-6)


# -- local DP -----------------------------------------------------------------------------------


def test_local_dp_clips_and_noises_from_the_clients_key() -> None:
    algo = compose("fedavg", MODEL, num_clients=4, clients_per_round=2, local=LocalSGD(lr=1.0),
                   aggregate=Aggregate())  # fmt: skip
    private = privatize(algo, LocalDP(clip_norm=0.05, noise_multiplier=2.0), num_clients=4,
                        clients_per_round=2)  # fmt: skip
    state = algo.init(Key.from_seed(0))
    gen = torch.Generator().manual_seed(0)
    base = TensorDataset(
        torch.randn(20, 6, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    )
    data = ClientData(base, torch.arange(20))
    task = ClientTask(1, 0, Key.from_seed(5))
    down = Downlink(round=0, params=state.params)
    plain = algo.client_update(down, data, task)
    noised = private.client_update(down, data, task)
    assert isinstance(private.client_update, VectorizedUpdate)  # chunks still train together
    delta = {n: plain.params[n].double() - state.params[n].double() for n in state.params}
    assert global_norm(delta) > 0.05  # so clipping acts
    clipped = clip_by_norm(delta, 0.05)
    gen = task.key.fold_in("dp").numpy_generator()
    for name in sorted(state.params):
        noise = torch.as_tensor(gen.standard_normal(tuple(state.params[name].shape))) * 0.1
        expected = (state.params[name].double() + clipped[name] + noise).float()
        torch.testing.assert_close(noised.params[name], expected, rtol=0, atol=1e-6)
    # Nothing else about the data leaves the client: no example count, loss or step count.
    assert (plain.num_examples, noised.num_examples) == (20, 1)
    assert (noised.metrics, noised.steps) == ({}, 0)
    assert plain.metrics


def test_a_non_finite_local_update_is_sent_as_nan_for_the_policy_to_handle() -> None:
    algo = compose("fedavg", MODEL, num_clients=4, clients_per_round=2, local=LocalSGD(),
                   aggregate=Aggregate())  # fmt: skip
    private = privatize(algo, LocalDP(1.0, 1.0), num_clients=4, clients_per_round=2)
    wrapper = private.client_update
    assert isinstance(wrapper, LocalNoiseUpdate)
    state = algo.init(Key.from_seed(0))
    broken = {n: t.clone() for n, t in state.params.items()}
    first = sorted(broken)[0]
    broken[first].view(-1)[0] = math.inf
    sent = wrapper.privatise(Downlink(0, state.params), _uplink(0, broken), Key.from_seed(1))
    assert all(bool(torch.isnan(t).all()) for t in sent.params.values())


def test_privatize_refuses_what_it_cannot_privatise() -> None:
    common: dict[str, Any] = {"num_clients": 4, "clients_per_round": 2, "local": LocalSGD()}
    common_counts = {"num_clients": 4, "clients_per_round": 2}
    with pytest.raises(ValueError, match="'scaffold' aggregates by its own rule"):
        privatize(scaffold(MODEL, **common), CentralDP(1.0, 1.0), **common_counts)
    privatize(fedavg(MODEL, **common), CentralDP(1.0, 1.0), num_clients=4, clients_per_round=2)
    from blazefl_fn.server.aggregators import median

    robust = compose("fedmedian", MODEL, **common, aggregate=Aggregate(aggregator=median))
    with pytest.raises(ValueError, match="mean aggregator"):
        privatize(robust, CentralDP(1.0, 1.0), num_clients=4, clients_per_round=2)
    privatize(robust, LocalDP(1.0, 1.0), num_clients=4, clients_per_round=2)  # post-processing

    def batchnorm() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3))

    normed = compose("fedavg", batchnorm, **common, aggregate=Aggregate())
    with pytest.raises(ValueError, match=r"buffers \['1.num_batches_tracked'.*with_params"):
        privatize(normed, CentralDP(1.0, 1.0), num_clients=4, clients_per_round=2)
    with pytest.raises(ValueError, match="clients would send as they are"):
        privatize(normed, LocalDP(1.0, 1.0), num_clients=4, clients_per_round=2)
    as_params = compose("fedavg", batchnorm, **common, aggregate=Aggregate(buffers="with_params"))
    privatize(as_params, CentralDP(1.0, 1.0), num_clients=4, clients_per_round=2)


def test_fixed_sampling_takes_exactly_the_clients_the_accountant_assumes() -> None:
    algo = compose("fedavg", MODEL, num_clients=50, clients_per_round=7, local=LocalSGD(),
                   aggregate=Aggregate())  # fmt: skip
    private = privatize(algo, CentralDP(1.0, 1.0), num_clients=50, clients_per_round=3,
                        sampling="fixed")  # fmt: skip
    state = private.init(Key.from_seed(0))
    assert {len(private.sample(state, Key.from_seed(0).fold_in(t))) for t in range(20)} == {3}


# -- the accountant and the budget ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["rdp", "prv"])
@pytest.mark.parametrize(("z", "q", "steps"), [(1.1, 0.01, 100), (0.8, 0.2, 7), (2.0, 1.0, 3)])
def test_epsilon_matches_opacus_computed_directly(
    method: str, z: float, q: float, steps: int
) -> None:
    direct = (
        opacus_accountants.RDPAccountant()
        if method == "rdp"
        else opacus_accountants.PRVAccountant()
    )
    direct.history = [(z, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's notes on its order grid, numpy's at q = 1
        expected = direct.get_epsilon(delta=1e-5)
    assert Accountant(z, q, 1e-5, method).epsilon(steps) == expected


def _gaussian_rdp_epsilon(z: float, steps: int, delta: float) -> float:
    """The RDP bound of ``steps`` Gaussian mechanisms (no sampling) from the closed form
    ``rdp(a) = steps * a / (2 z^2)`` (Mironov 2017), converted to (epsilon, delta) as Balle et
    al. (2020, Thm. 21) do, over the orders Opacus searches."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    return min(
        steps * a / (2 * z * z) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in orders
    )


def _gaussian_exact_epsilon(z: float, steps: int, delta: float) -> float:
    """The exact epsilon of ``steps`` Gaussian mechanisms: mu-GDP with mu = sqrt(steps) / z,
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang 2018)."""
    mu = math.sqrt(steps) / z

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize(("z", "steps"), [(0.8, 1), (1.5, 10), (4.0, 200)])
def test_epsilon_without_sampling_matches_the_gaussian_mechanisms_closed_forms(
    z: float, steps: int
) -> None:
    rdp = Accountant(z, 1.0, 1e-5, "rdp").epsilon(steps)
    assert rdp == pytest.approx(_gaussian_rdp_epsilon(z, steps, 1e-5), rel=1e-9)
    prv = Accountant(z, 1.0, 1e-5, "prv").epsilon(steps)
    exact = _gaussian_exact_epsilon(z, steps, 1e-5)
    assert exact <= prv + 1e-9  # PRV bounds from above, within its eps_error of 0.01
    assert prv == pytest.approx(exact, abs=0.02)
    assert exact < rdp  # RDP is the looser bound


def test_local_dp_is_accounted_without_amplification() -> None:
    acc = Accountant.for_dp(LocalDP(1.0, 2.0), sample_rate=0.1, delta=1e-5)
    # Any two datasets of a client are neighbours: sensitivity 2C, multiplier z / 2, q = 1.
    assert (acc.noise_multiplier, acc.sample_rate) == (1.0, 1.0)
    assert Accountant.for_dp(CentralDP(1.0, 2.0), 0.1, 1e-5).sample_rate == 0.1
    assert Accountant(0.0, 0.5, 1e-5).epsilon(1) == math.inf
    assert Accountant(1.0, 0.5, 1e-5).epsilon(0) == 0.0


def test_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    config = RunConfig(**SMALL | {"rounds": 40}, dp="central", dp_noise_multiplier=1.0,
                       dp_target_epsilon=6.0)  # fmt: skip
    acc = Accountant(1.0, 4 / 12, 1e-5)
    allowed = max(t for t in range(41) if acc.epsilon(t) <= 6.0)
    assert 0 < allowed < 40
    log = MetricsLog(tmp_path / "m.jsonl")
    result = simulate(config, [log])
    assert result.state.round == allowed
    assert result.stop_reason is not None
    assert result.stop_reason.startswith(f"stopped before round {allowed + 1}:")
    assert result.privacy is not None
    assert result.privacy["epsilon"] <= 6.0
    records = read_metrics(tmp_path / "m.jsonl")
    assert [r["privacy"]["epsilon"] for r in records] == [
        acc.epsilon(t) for t in range(1, allowed + 1)
    ]
    assert math.isfinite(result.accuracy)  # the final state was evaluated
    budget = PrivacyBudget(acc, 6.0)
    assert budget.stop_before(result.state) == result.stop_reason
    # Rounds that were not evaluated: the stop still evaluates the final state.
    sparse = simulate(attrs.evolve(config, eval_every=1000))
    assert sparse.params_sha256 == result.params_sha256
    assert sparse.accuracy == result.accuracy


# -- one digest: executors, resume ---------------------------------------------------------------

DP_RUNS = {
    "central": {"dp": "central", "dp_noise_multiplier": 0.8},
    "adaptive": {
        "dp": "central",
        "dp_adaptive_quantile": 0.5,
        "dp_noise_multiplier": 0.5,
        "dp_count_noise": 1.0,
    },
    "local": {"dp": "local", "dp_noise_multiplier": 0.3, "algorithm": "fedadam"},
    "fixed": {"dp": "central", "dp_sampling": "fixed"},
    "central-adam": {"dp": "central", "algorithm": "fedadam"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DP_RUNS))
def test_a_private_run_has_one_digest_across_executors(name: str, processes2: Processes) -> None:
    digests = {
        executor: simulate(
            RunConfig(**SMALL | DP_RUNS[name], executor=executor, workers=2),
            executor=processes2 if executor == "processes" else None,
        ).params_sha256
        for executor in ("sequential", "threads", "processes")
    }
    assert len(set(digests.values())) == 1, digests
    plain = simulate(RunConfig(**SMALL | {"algorithm": DP_RUNS[name].get("algorithm", "fedavg")}))
    assert plain.params_sha256 not in digests.values()  # DP changed the model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adaptive", "local", "central-adam"])
def test_a_resumed_private_run_gives_the_same_bits_and_epsilon(tmp_path: Path, name: str) -> None:
    config = RunConfig(**SMALL | DP_RUNS[name] | {"rounds": 6})
    whole = simulate(config)
    simulate(attrs.evolve(config, rounds=3), checkpoint_dir=tmp_path / "ck")
    resumed = simulate(config, resume=tmp_path / "ck")
    assert resumed.params_sha256 == whole.params_sha256
    assert resumed.privacy == whole.privacy
    assert isinstance(whole.state.aux, DPState) == (name != "local")
    if name == "adaptive":
        assert resumed.state.aux.clip_norm == whole.state.aux.clip_norm != 1.0


def test_empty_poisson_rounds_still_noise_and_count() -> None:
    # Rate 1/12: a round samples nobody with probability (11/12)^12 ~ 0.35.
    config = RunConfig(clients=12, clients_per_round=1, rounds=8, dp="central")
    result = simulate(config)
    assert result.state.round == 8
    empty = [r for r in result.reports if not r.clients]
    assert empty, [r.clients for r in result.reports]
    assert result.privacy is not None
    assert result.privacy["epsilon"] == Accountant(1.0, 1 / 12, 1e-5).epsilon(8)


def test_a_config_stored_before_dp_existed_loads_with_dp_off() -> None:
    stored = config_dict(RunConfig(**SMALL))
    for name in [n for n in stored if n.startswith("dp")]:
        del stored[name]
    assert config_from_dict(stored) == RunConfig(**SMALL)
    partial = config_dict(RunConfig(**SMALL, dp="central"))
    del partial["dp_noise_multiplier"]  # an edited config: some DP fields, not all
    with pytest.raises(ValueError, match=r"config fields \['dp_noise_multiplier'\] are missing"):
        config_from_dict(partial)
    del stored["rounds"]
    with pytest.raises(ValueError, match=r"config fields \['rounds'\] are missing"):
        config_from_dict(stored)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_the_vectorized_executor_runs_private_rounds_close_to_per_client(mode: str) -> None:
    config = RunConfig(**SMALL | {"dp": mode, "dp_noise_multiplier": 0.5})
    per_client = simulate(config)
    vectorized = simulate(attrs.evolve(config, executor="vectorized"))
    for name, value in per_client.state.params.items():
        torch.testing.assert_close(vectorized.state.params[name], value, rtol=1e-4, atol=1e-5)
    assert vectorized.privacy == per_client.privacy


@pytest.mark.parametrize(
    ("z", "q", "rounds"), [(0.3, 0.1, 100), (1.0, 0.1, 1000), (1.0, 0.01, 100_000), (2.0, 1.0, 7)]
)
def test_the_prv_grid_estimate_is_opacuss_own(z: float, q: float, rounds: int) -> None:
    # The bound on the PRV accountant's memory reads the grid Opacus would build; if Opacus
    # changes how it sizes the grid, this fails rather than the bound drifting.
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    from blazefl_fn.privacy.privatize import prv_points

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        domain = PRVAccountant()._get_domain(  # pyright: ignore[reportPrivateUsage]
            [PoissonSubsampledGaussianPRV(q, z)], [rounds], 0.01, 1e-5 / 1000
        )
    assert abs(prv_points(z, q, rounds, 1e-5) - domain.size) <= 2


def test_the_prv_accountant_refuses_a_grid_of_gigabytes_before_building_it() -> None:
    accountant = Accountant(noise_multiplier=0.03, sample_rate=0.1, delta=1e-5, method="prv")
    with pytest.raises(ValueError, match=r"would discretize 100 rounds .* on 38\d,\d{3},\d{3}"):
        accountant.epsilon(100)


def test_local_dp_at_the_noise_floor_is_accounted_at_half_of_it() -> None:
    # Local DP is charged at z / 2: an accountant must take what the mechanism allows.
    accountant = Accountant.for_dp(LocalDP(1.0, 0.0015), 0.1, 1e-5)
    assert accountant.noise_multiplier == 0.00075
    assert accountant.epsilon(3) > 1e6
