"""`blazefl-fn run --dp ...` as a user runs it: the spent budget in the output and the log,
the budget stop, and one-line errors for bad values."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from _cli import Run, run_inline

from blazefl_fn.privacy.privatize import Accountant
from blazefl_fn.run.metrics_log import read_metrics

pytest.importorskip("opacus.accountants")

QUICK = ["--clients", "12", "--clients-per-round", "4", "--rounds", "3", "--quiet"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """The command with QUICK's flags, in this process (the one-line status of a real process
    is `tests/test_cli_errors.py`'s)."""
    return functools.partial(run_inline, capsys, "run", *QUICK)


def test_json_and_metrics_log_report_the_epsilon_of_every_round(cli: Run, tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    done = cli("--dp", "central", "--dp-noise-multiplier", "1.2", "--json", "--metrics", str(log))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    acc = Accountant(1.2, 4 / 12, 1e-5)
    assert result["privacy"] == {"epsilon": acc.epsilon(3), "delta": 1e-5}
    assert result["stop_reason"] is None
    assert [r["privacy"]["epsilon"] for r in read_metrics(log)] == [
        acc.epsilon(t) for t in (1, 2, 3)
    ]


def test_the_budget_stop_names_the_round_and_exits_0(
    cli: Run,
) -> None:
    acc = Accountant(1.0, 4 / 12, 1e-5, "prv")
    target = (acc.epsilon(2) + acc.epsilon(3)) / 2  # round 3 would exceed it
    done = cli("--rounds", "10", "--dp", "central", "--dp-accountant", "prv",
                "--dp-target-epsilon", repr(target))  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("privacy budget: stopped before round 3: it would spend epsilon=")
    assert f"epsilon {acc.epsilon(2):.4g}" in lines[1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp", "central", "--dp-noise-multiplier", "-1"], "dp_noise_multiplier must be"),
        (["--dp", "central", "--dp-clip", "0"], "dp_clip must be a finite number in (0,"),
        (["--dp", "central", "--dp-delta", "1"], "dp_delta must be a finite number in (0, 1)"),
        (["--dp", "central", "--dp-delta", "0"], "dp_delta must be"),
        (["--dp", "local", "--dp-target-epsilon", "0"], "dp_target_epsilon must be"),
        (["--dp", "central", "--dp-target-epsilon", "nan"], "dp_target_epsilon must be"),
        (["--dp-clip", "2"], "dp_clip=2.0 applies with dp"),
        (["--dp", "central", "--algorithm", "scaffold"], "central DP applies to"),
        (["--dp", "central", "--clip-norm", "1"], "does not apply with dp"),
        (["--dp", "local", "--dp-adaptive-quantile", "0.5"], "adaptive clipping is central DP's"),
        (["--dp", "central", "--dp-adaptive-quantile", "0.5"], "count noise"),
        (["--dp", "laplace"], "invalid choice"),
        (["--dp", "central", "--dp-accountant", "pld"], "invalid choice"),
        (["--dp", "central", "--dp-sampling", "shuffle"], "invalid choice"),
        (["--dp", "central", "--dp-adaptive-quantile", "1.5"], "dp_adaptive_quantile must be"),
        (
            ["--dp", "central", "--dp-adaptive-quantile", "0.5", "--dp-clip-lr", "0"],
            "dp_clip_lr must be",
        ),
        (
            ["--dp", "central", "--dp-adaptive-quantile", "0.5", "--dp-count-noise", "-1"],
            "dp_count_noise must be",
        ),
        (["--dp", "central", "--dp-clip-lr", "0.5"], "applies with dp_adaptive_quantile"),
        (
            ["--dp", "central", "--dp-noise-multiplier", "0", "--dp-target-epsilon", "1"],
            "without noise no round fits",
        ),
    ],
)
def test_bad_privacy_flags_exit_2_in_one_line(cli: Run, flags: list[str], message: str) -> None:
    done = cli(*flags)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
