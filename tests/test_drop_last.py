"""``drop_last``: a final batch smaller than ``batch_size`` left out, the same on every path."""

from __future__ import annotations

import json

import pytest
import torch
from _cli import run_inline
from _training import train_local, train_local_chunk
from torch import nn

import blazefl_fn as fl
from blazefl_fn.client.training import LocalSGD, LocalTraining, train
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.keys import Key
from blazefl_fn.models import build_template
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import check_resumable, config_dict, config_from_dict
from blazefl_fn.tree import from_module


def _client(n: int, features: int = 4, seed: int = 0) -> ClientData:
    generator = torch.Generator().manual_seed(seed)
    base = TensorDataset(
        torch.randn(n, features, generator=generator),
        torch.randint(0, 3, (n,), generator=generator),
    )
    return ClientData(base, torch.arange(n))


def _batch_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(("n", "size"), [(11, 5), (10, 5), (4, 5), (0, 3), (7, 1)])
def test_batches_drop_only_a_short_final_batch_and_keep_the_shuffle(n: int, size: int) -> None:
    client = _client(n)
    full = list(client.batches(size, Key.from_seed(1).torch_generator()))
    kept = list(client.batches(size, Key.from_seed(1).torch_generator(), drop_last=True))
    assert len(kept) == n // size
    assert all(y.shape[0] == size for _, y in kept)
    for (xa, ya), (xb, yb) in zip(kept, full, strict=False):  # the same full batches
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


def test_a_batch_norm_model_trains_on_an_uneven_client_only_with_drop_last() -> None:
    # Before: no way to leave out the final batch of one example, and training crashed.
    net, client, key = _batch_norm_net(), _client(11), Key.from_seed(2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        train(net, net.state_dict(), client, key, LocalTraining(batch_size=5))
    out = train(net, net.state_dict(), client, key, LocalTraining(batch_size=5, drop_last=True))
    assert (out.result.examples, out.result.steps) == (11, 2)


def test_a_client_smaller_than_a_batch_takes_no_step_with_drop_last() -> None:
    net = nn.Linear(4, 3)
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    out = train(
        net, params, _client(3), Key.from_seed(0), LocalTraining(batch_size=5, drop_last=True)
    )
    assert out.result.steps == 0
    assert all(torch.equal(out.params[k], params[k]) for k in params)


def test_local_sgd_passes_drop_last_to_its_training() -> None:
    assert LocalSGD(drop_last=True).drop_last
    assert not LocalSGD().drop_last
    with pytest.raises(TypeError):
        LocalTraining(drop_last=1)  # type: ignore[arg-type]


def test_vectorized_chunks_drop_the_same_batches_as_per_client_training() -> None:
    template = build_template(lambda: nn.Linear(4, 3))
    params = from_module(template)
    clients = [_client(n, seed=n) for n in (11, 3, 10, 0, 17)]
    keys = [Key.from_seed(5).fold_in(c) for c in range(len(clients))]
    config = LocalSGD(epochs=2, batch_size=5, lr=0.1, drop_last=True)
    expected = [
        train_local(template, params, c, k, config) for c, k in zip(clients, keys, strict=True)
    ]
    got = train_local_chunk(template, params, clients, keys, config)
    for (want, want_metrics), (have, have_metrics) in zip(expected, got, strict=True):
        assert max(float((want[n] - have[n]).abs().max()) for n in want) < 1e-6
        assert (want_metrics["loss"] != want_metrics["loss"]) == (
            have_metrics["loss"] != have_metrics["loss"]
        )
    # Without drop_last the 11- and 17-example clients train on one more batch each epoch.
    plain = train_local_chunk(
        template, params, clients, keys, LocalSGD(epochs=2, batch_size=5, lr=0.1)
    )
    assert max(float((plain[0][0][n] - got[0][0][n]).abs().max()) for n in params) > 0


def test_a_stored_config_from_before_drop_last_resumes_with_it_off() -> None:
    stored = config_dict(RunConfig())
    del stored["drop_last"]
    assert config_from_dict(stored).drop_last is False
    with pytest.raises(ValueError, match="drop_last=False"):
        check_resumable(RunConfig(), RunConfig(drop_last=True))


def test_cli_drop_last_changes_the_bits_and_is_in_the_resolved_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def run(*flags: str) -> dict[str, object]:
        done = run_inline(capsys, "run", "--json", "--quiet", "--rounds", "2", "--clients", "4",
                          "--clients-per-round", "2", "--batch-size", "7", *flags)  # fmt: skip
        assert done.returncode == 0, done.stderr
        out: dict[str, object] = json.loads(done.stdout)
        return out

    plain, dropped = run(), run("--drop-last")
    assert plain["params_sha256"] != dropped["params_sha256"]
    config = dropped["config"]
    assert isinstance(config, dict)
    assert config["drop_last"] is True
    assert config["batch_size"] == 7
    assert config_from_dict(config) == RunConfig(
        rounds=2, clients=4, clients_per_round=2, batch_size=7, drop_last=True
    )
    assert fl.LocalSGD(drop_last=True).drop_last  # exported where users build it


def test_cli_drop_last_takes_no_value(capsys: pytest.CaptureFixture[str]) -> None:
    from blazefl_fn.cli._commands import main

    assert main(["run", "--drop-last=yes", "--rounds", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "blazefl-fn: error: argument --drop-last: ignored explicit argument 'yes'"
