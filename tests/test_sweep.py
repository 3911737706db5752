"""Experiment files (``run --config``) and sweeps (``blazefl-fn sweep``): the file is the flags,
each cell is the run it names (same bits, resumable), and the summary is what the logs say."""

from __future__ import annotations

import csv
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _cli import run_cli
from _procs import alive, descendants

from blazefl_fn.cli import main
from blazefl_fn.cli._experiment_file import (
    Experiment,
    UnreadableExperiment,
    cells,
    parse_experiment,
    read_experiment,
    tokens,
)
from blazefl_fn.cli._flags import UsageError
from blazefl_fn.cli._t_quantile import t_quantile
from blazefl_fn.run.metrics_log import read_metrics

# A tiny synthetic job: a cell's run is a fraction of a second after its imports.
BASE = "clients = 6\nclients-per-round = 3\nrounds = 3\nbatch_size = 20\n"
GRID = BASE + '[sweep]\nalgorithm = ["fedavg", "scaffold"]\nseed = [0, 1]\n'


def _parse(text: str, *, sweep: bool = True) -> Experiment:
    return parse_experiment("exp.toml", text, sweep=sweep)


# --- experiment files ----------------------------------------------------------------------


def test_keys_are_run_flags_in_either_spelling() -> None:
    experiment = _parse('data-dir = "d"\nclients_per_round = 3\ndrop_last = true\nlr = 1e-5\n')
    assert experiment.settings == (
        ("data_dir", "d"),
        ("clients_per_round", 3),
        ("drop_last", True),
        ("lr", 1e-5),
    )
    assert tokens(experiment.settings) == [
        "--data-dir=d",
        "--clients-per-round=3",
        "--drop-last",
        "--lr=1e-05",
    ]
    # A negative value stays a value; a false switch is no flag.
    assert tokens([("lr", -1.0), ("drop_last", False)]) == ["--lr=-1.0"]


def test_the_personalised_benchmark_is_twelve_valid_runs() -> None:
    """``benchmarks/personalized.toml`` (docs/benchmarks.md): every cell is a run the flags
    accept, with the settings the page describes."""
    from blazefl_fn.cli._commands import _config
    from blazefl_fn.cli._flags import build_parser

    grid = cells(read_experiment("benchmarks/personalized.toml", sweep=True))
    assert len(grid) == 12
    configs = [_config(build_parser().parse_args(["run", *c.tokens])) for c in grid]
    assert {(c.algorithm, c.seed) for c in configs} == {
        (a, s) for a in ("fedavg", "ditto", "fedrep", "fedper") for s in (0, 1, 2)
    }
    for c in configs:
        assert (c.dataset, c.data_dir, c.partition, c.alpha) == ("mnist", "mnist", "dirichlet", 0.1)
        assert (c.model, c.clients, c.client_test_fraction) == ("mlp", 100, 0.2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr = 0.1\n", "unknown key 'lrr' (not a run flag); did you mean 'lr'?"),
        ("[sweep]\nsed = [1]\n", "unknown key 'sed' (not a run flag); did you mean 'seed'?"),
        ("[sweep]\nseed = []\n", "axis 'seed' is empty"),
        ("[sweep]\nseed = [1, 1]\n", "axis 'seed' repeats the value 1"),
        ("seed = 1\n[sweep]\nseed = [1, 2]\n", "'seed' is both a setting and a [sweep] axis"),
        ("[sweep]\nseed = 3\n", "axis 'seed' must be an array"),
        ("lr = [0.1, 0.2]\n", "'lr' needs one value, got an array; axes go in the [sweep]"),
        ("[sweep]\nlr = [[0.1]]\n", "a value of axis 'lr' needs one value, got an array"),
        ("lr = 0.1\nl-r = 1\n", "unknown key 'l-r'"),
        ("data-dir = 'a'\ndata_dir = 'b'\n", "'data_dir' is given twice"),
        ("[other]\nx = 1\n", "unknown key 'other'"),
        ('[sweep]\nmetrics = ["m"]\n', "key 'metrics' is set by the sweep for each cell"),
    ],
)
def test_a_bad_file_is_one_line(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        _parse(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_run_refuses_a_sweep_table_and_not_toml_is_unreadable() -> None:
    with pytest.raises(UsageError, match=r"has a \[sweep\] table: run it with blazefl-fn sweep"):
        _parse("[sweep]\nseed = [0]\n", sweep=False)
    with pytest.raises(UnreadableExperiment, match="is not TOML"):
        _parse("rounds = \n")


def test_a_switch_takes_a_boolean() -> None:
    with pytest.raises(UsageError, match="--drop-last: is a switch, set it to true or false"):
        tokens([("drop_last", 1)])
    with pytest.raises(UsageError, match="--rounds: expected a value, got the boolean True"):
        tokens([("rounds", True)])


def test_cells_are_the_grid_last_axis_fastest() -> None:
    grid = cells(_parse(GRID))
    assert [c.axes for c in grid] == [
        (("algorithm", "fedavg"), ("seed", 0)),
        (("algorithm", "fedavg"), ("seed", 1)),
        (("algorithm", "scaffold"), ("seed", 0)),
        (("algorithm", "scaffold"), ("seed", 1)),
    ]
    assert grid[3].tokens[-2:] == ("--algorithm=scaffold", "--seed=1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr = 0.1\n", "exp.toml: unknown key 'lrr' (not a run flag); did you mean 'lr'?"),
        ('clients = "ten"\n', "exp.toml: argument --clients: invalid int value: 'ten'"),
        ("clients = 1.5\n", "exp.toml: argument --clients: invalid int value: '1.5'"),
        # The flag's own message: the file's value is the flag's value.
        ("clients = 0\n", "clients must be an integer in [1, 10000000], got 0"),
        ("drop_last = 1\n", "exp.toml: argument --drop-last: is a switch, set it to true or false"),
    ],
)
def test_run_config_bad_values_exit_2_in_one_line(
    text: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("exp.toml").write_text(text)
    assert main(["run", "--config", "exp.toml"]) == 2
    err = capsys.readouterr().err
    assert err == f"blazefl-fn: error: {message}\n"


def test_run_config_missing_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(tmp_path / "none.toml")]) == 1
    assert capsys.readouterr().err.endswith("none.toml: No such file or directory\n")


def test_run_config_is_the_flags_and_flags_override_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text("rounds = 5\nclients = 5\nclients-per-round = 2\nlr = 0.05\nquiet = true\n")
    log = tmp_path / "m.jsonl"
    assert (
        main(["run", "--config", str(exp), "--rounds", "2", "--json", "--metrics", str(log)]) == 0
    )
    from_file = json.loads(capsys.readouterr().out)
    flags = ["--rounds", "2", "--clients", "5", "--clients-per-round", "2", "--lr", "0.05"]
    assert main(["run", *flags, "--json", "--quiet"]) == 0
    from_flags = json.loads(capsys.readouterr().out)
    assert from_file["params_sha256"] == from_flags["params_sha256"]
    assert from_file["config"] == from_flags["config"]
    assert from_file["config"]["rounds"] == 2  # the command line's value, not the file's
    assert read_metrics(log)[0]["config"] == from_file["config"]


def test_run_config_resumes_like_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text("clients = 5\nclients-per-round = 2\nrounds = 2\nquiet = true\njson = true\n")
    ck = str(tmp_path / "ck")
    assert main(["run", "--config", str(exp), "--checkpoint-dir", ck]) == 0
    capsys.readouterr()
    assert main(["run", "--config", str(exp), "--resume", ck, "--rounds", "4"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "run",
                "--clients",
                "5",
                "--clients-per-round",
                "2",
                "--rounds",
                "4",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert resumed["params_sha256"] == json.loads(capsys.readouterr().out)["params_sha256"]


@pytest.mark.slow
def test_run_config_portable_restarts_with_its_pins(tmp_path: Path) -> None:
    # The command restarts itself with the pins (os.execve), reading the file again.
    exp = tmp_path / "exp.toml"
    exp.write_text("portable = true\nquiet = true\njson = true\nrounds = 100\n")
    done = run_cli("run", "--config", str(exp))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["portable"] is True
    assert out["params_sha256"] == (  # tests/test_portable.py's digest of the default job
        "019136b63ab3387d374fb00e5b8cc997cebddcad382389c4fc46c68ab262cb95"
    )


def test_sweep_bad_file_exits_2_in_one_line_without_traceback(tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(BASE + "[sweep]\nlr = [0.1, -1]\n")
    done = run_cli("sweep", str(exp), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr == (
        f"blazefl-fn: error: {exp}: cell lr=-1: lr must be a finite number in (0, 10000], "
        "got -1.0\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [["sweep"], ["sweep", "--summarize", "d", "--out", "o"], ["sweep", "e.toml"]],
)
def test_sweep_flags_need_a_file_and_out_or_summarize(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("jobs", ["0", "two", "-1", "5000"])
def test_a_bad_jobs_value_is_one_line(jobs: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "e.toml", "--out", "o", "--jobs", jobs]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--jobs" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--ray-address", "nope"], "argument --ray-address: ray address must be auto or HOST"),
        (["--ray-address", "h:0"], "argument --ray-address: ray address must be auto or HOST"),
        (["--ray-address", "127.0.0.2:6379", "--ray-node-ip", "10.255.0.9"],
         "argument --ray-node-ip: ray node IP 10.255.0.9 is not an address of this machine"),
        (["--ray-node-ip", "127.0.0.2"], "--ray-node-ip applies to a Ray sweep"),
        (["--ray-address", "127.0.0.2:6379", "--oversubscribe"],
         "--oversubscribe counts this machine's CPUs"),
    ],
)  # fmt: skip
def test_bad_ray_flags_are_one_line(
    flags: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sweep", "e.toml", "--out", "o", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert words in err
    assert "Traceback" not in err


def test_a_ray_sweep_refuses_cells_of_the_ray_executor_before_joining(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(BASE + '[sweep]\nexecutor = ["sequential", "ray"]\n')
    # Nothing answers at this address: the refusal comes before any attempt to join.
    code = main(["sweep", str(exp), "--out", str(tmp_path / "o"), "--ray-address", "127.0.0.1:1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cell executor=ray: executor ray inside a Ray sweep" in err


def test_a_ray_sweep_with_no_cluster_there_is_one_line_within_seconds(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="needs the ray extra")
    exp = tmp_path / "exp.toml"
    exp.write_text(GRID)
    start = time.monotonic()
    done = run_cli("sweep", str(exp), "--out", str(tmp_path / "o"), "--ray-address", "127.0.0.1:1")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "blazefl-fn: error: no Ray cluster answers at 127.0.0.1:1 (connection refused); start "
        "one there (ray start --head) or pass its address"
    ]
    assert time.monotonic() - start < 60


# --- statistics -------------------------------------------------------------------------------


def test_t_quantile_matches_the_tables() -> None:
    table = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 9: 2.2621572, 30: 2.0422725}
    for df, value in table.items():
        assert t_quantile(df) == pytest.approx(value, abs=1e-6)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 17, 100):
        assert t_quantile(df) == pytest.approx(float(scipy_stats.t.ppf(0.975, df)), rel=1e-9)


# --- sweeps end to end ---------------------------------------------------------------------


def _summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _numbers(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows without wall time (the only number a machine's load changes)."""
    return [{k: v for k, v in r.items() if k != "wall_seconds_mean"} for r in rows]


def _cell_dirs(out: Path) -> list[Path]:
    return sorted(d for d in out.iterdir() if d.is_dir())


@pytest.mark.slow
def test_a_sweep_is_its_runs_and_its_summary_is_its_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(GRID)
    out = tmp_path / "out"
    done = run_cli("sweep", str(exp), "--out", str(out), "--jobs", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum(" done  algorithm=" in line for line in lines) == 4, done.stdout
    cells_ = _cell_dirs(out)
    assert len(cells_) == 4
    # Each cell: the same bits as the single run of its settings.
    for directory in cells_:
        result = json.loads((directory / "result.json").read_text())
        config = result["config"]
        flags = [
            f"--algorithm={config['algorithm']}",
            f"--seed={config['seed']}",
            "--clients=6",
            "--clients-per-round=3",
            "--rounds=3",
            "--batch-size=20",
        ]
        assert main(["run", *flags, "--json", "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["params_sha256"] == result["params_sha256"]
    # The summary, recomputed from the metrics logs here.
    rows = {r["algorithm"]: r for r in _summary(out)}
    assert set(rows) == {"fedavg", "scaffold"}
    for algorithm, row in rows.items():
        logs = []
        for directory in cells_:
            records = read_metrics(directory / "metrics.jsonl")
            if records[0]["config"]["algorithm"] == algorithm:
                logs.append(records)
        finals = [records[-1]["eval"]["accuracy"] for records in logs]
        best = [max(r["eval"]["accuracy"] for r in records) for records in logs]
        mean, std = statistics.mean(finals), statistics.stdev(finals)
        half = 12.706204736174707 * std / math.sqrt(2)  # t(0.975, 1)
        assert row["n"] == "2"
        assert row["seeds"] == "0 1"
        assert float(row["final_accuracy_mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(row["final_accuracy_std"]) == pytest.approx(std, rel=1e-12)
        assert float(row["final_accuracy_ci95_low"]) == pytest.approx(mean - half, rel=1e-9)
        assert float(row["final_accuracy_ci95_high"]) == pytest.approx(mean + half, rel=1e-9)
        assert float(row["best_accuracy_mean"]) == pytest.approx(statistics.mean(best))
        up = statistics.mean(sum(r["bytes_up"] for r in records) for records in logs)
        assert float(row["bytes_up_mean"]) == up
    assert (out / "curves.png").stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert md.startswith("| algorithm | seeds | final accuracy | 95% interval |")
    # --summarize rebuilds the same files from the logs alone.
    before = {p: (out / p).read_bytes() for p in ("summary.md", "summary.csv")}
    for p in ("summary.md", "summary.csv", "curves.png"):
        (out / p).unlink()
    assert main(["sweep", "--summarize", str(out)]) == 0
    assert {p: (out / p).read_bytes() for p in before} == before
    assert (out / "curves.png").exists()
    # Finished cells are skipped; a setting that fixes the bits may not change.
    capsys.readouterr()
    assert main(["sweep", str(exp), "--out", str(out)]) == 0
    rerun = capsys.readouterr().out
    assert "4 cells, 4 finished already" in rerun
    assert " done " not in rerun
    # How cells are executed may change: they stay finished.
    exp.write_text('executor = "threads"\nworkers = 2\n' + GRID)
    assert main(["sweep", str(exp), "--out", str(out)]) == 0
    assert "4 cells, 4 finished already" in capsys.readouterr().out
    exp.write_text(GRID.replace("batch_size = 20", "batch_size = 10"))
    assert main(["sweep", str(exp), "--out", str(out)]) == 2
    refused = capsys.readouterr().err
    assert refused.count("\n") == 1
    assert "holds a sweep with other settings (batch_size 20 -> 10)" in refused


@pytest.mark.slow
def test_per_client_accuracy_columns_are_the_logs_final_evaluations(tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(
        BASE + 'model = "mlp"\nclient-test-fraction = 0.3\neval-every = 2\n'
        '[sweep]\nalgorithm = ["fedavg", "fedper"]\nseed = [0, 1]\n'
    )
    out = tmp_path / "out"
    done = run_cli("sweep", str(exp), "--out", str(out), "--jobs", "2")
    assert done.returncode == 0, done.stderr
    rows = {r["algorithm"]: r for r in _summary(out)}
    assert set(rows) == {"fedavg", "fedper"}
    md = (out / "summary.md").read_text()
    assert "| best accuracy | client accuracy | worst-10% client accuracy | MB up |" in md
    for algorithm, row in rows.items():
        finals = []
        for directory in _cell_dirs(out):
            records = read_metrics(directory / "metrics.jsonl")
            if records[0]["config"]["algorithm"] == algorithm:
                assert records[-1]["round"] == 3  # the last round is evaluated
                finals.append(records[-1]["eval"])
        for name in ("client_accuracy", "client_accuracy_p10"):
            values = [f[name] for f in finals]
            mean, std = statistics.mean(values), statistics.stdev(values)
            assert float(row[f"{name}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{name}_std"]) == pytest.approx(std, rel=1e-12)
            assert f"{mean:.4f} ± {std:.4f}" in md
    header = list(rows["fedavg"])
    at = header.index("best_accuracy_mean")
    assert header[at + 1 : at + 5] == [
        "client_accuracy_mean",
        "client_accuracy_std",
        "client_accuracy_p10_mean",
        "client_accuracy_p10_std",
    ]


@pytest.mark.slow
def test_values_added_to_an_axis_extend_the_sweep_in_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp, out = tmp_path / "exp.toml", tmp_path / "out"
    exp.write_text(BASE + "[sweep]\nseed = [0]\n")
    assert main(["sweep", str(exp), "--out", str(out)]) == 0
    first = {d.name: (d / "result.json").read_bytes() for d in out.iterdir() if d.is_dir()}
    capsys.readouterr()
    # One more seed: the finished cell is kept as it is, the new one runs.
    exp.write_text(BASE + "[sweep]\nseed = [0, 1]\n")
    assert main(["sweep", str(exp), "--out", str(out)]) == 0
    assert "2 cells, 1 finished already" in capsys.readouterr().out
    for name, result in first.items():
        assert (out / name / "result.json").read_bytes() == result
    assert [row["seeds"] for row in _summary(out)] == ["0 1"]
    stored = json.loads((out / "sweep.json").read_text())["cells"]
    assert len(stored) == 2
    assert set(first) < set(stored)
    # A file that no longer names a stored cell is refused, and the record is left as it was.
    exp.write_text(BASE + "[sweep]\nseed = [1, 2]\n")
    assert main(["sweep", str(exp), "--out", str(out)]) == 2
    refused = capsys.readouterr().err
    assert refused.count("\n") == 1
    assert "holds a sweep with other settings (seed 0/1 -> 1/2)" in refused
    assert json.loads((out / "sweep.json").read_text())["cells"] == stored
    # Fewer rounds than finished cells ran cannot be reached from their checkpoints.
    exp.write_text(BASE.replace("rounds = 3", "rounds = 2") + "[sweep]\nseed = [0, 1]\n")
    assert main(["sweep", str(exp), "--out", str(out)]) == 2
    refused = capsys.readouterr().err
    assert refused.count("\n") == 1
    assert "already ran 3 rounds, more than rounds=2; rounds may only be raised" in refused
    for name, result in first.items():
        assert (out / name / "result.json").read_bytes() == result


@pytest.mark.slow
def test_a_failed_cell_does_not_stop_the_others(tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    # lr 3000 makes the MLP's training diverge in round 1 (tests/test_cli_errors.py).
    exp.write_text('rounds = 2\nmodel = "mlp"\n[sweep]\nlr = [3000.0, 0.01]\n')
    out = tmp_path / "out"
    done = run_cli("sweep", str(exp), "--out", str(out))
    assert done.returncode == 3
    assert "FAILED  lr=3000.0  exit 3: blazefl-fn: error:" in done.stdout
    assert "done  lr=0.01" in done.stdout
    assert done.stderr.startswith("blazefl-fn: error: 1 of 2 cells failed: lr=3000.0 (")
    assert [r["lr"] for r in _summary(out)] == ["0.01"]


def _wait(predicate: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not callable(predicate) or not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _start_sweep(exp: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blazefl_fn", "sweep", str(exp), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _unfinished_rounds(out: Path) -> int | None:
    """Rounds logged by the cell under way, once a cell has finished (None before)."""
    if not out.is_dir() or not any(out.glob("*/result.json")):
        return None
    for log in out.glob("*/metrics.jsonl"):
        if not (log.parent / "result.json").exists():
            return len(read_metrics(log))
    return None


def _stop_when(
    sweep: subprocess.Popen[str], ready: Callable[[], bool], signum: int
) -> tuple[set[int], str]:
    """Send ``signum`` to the sweep once ``ready``; returns the processes it had started and
    what it wrote on stderr."""
    try:
        _wait(ready)
        children = descendants(sweep.pid)
        sweep.send_signal(signum)
        _, err = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    return children, err


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_same_summary(tmp_path: Path) -> None:
    # SCAFFOLD: the resumed cells restore client state (control variates) from the checkpoint.
    # Batches of 4: rounds slow enough (tens of ms) to be stopped in the middle of a cell.
    grid = BASE.replace("rounds = 3", "rounds = 30").replace("batch_size = 20", "batch_size = 4")
    exp = tmp_path / "exp.toml"
    exp.write_text(grid + '[sweep]\nalgorithm = ["scaffold"]\nseed = [0, 1]\n')
    whole = tmp_path / "whole"
    done = run_cli("sweep", str(exp), "--out", str(whole), "--jobs", "2")
    assert done.returncode == 0, done.stderr

    # Killed outright (no cleanup in the sweep): its cell stops alone, checkpointed.
    out = tmp_path / "stopped"
    sweep = _start_sweep(exp, out)
    children, _ = _stop_when(
        sweep, lambda: 3 <= (_unfinished_rounds(out) or 0) < 12, signal.SIGKILL
    )
    _wait(lambda: not any(alive(pid) for pid in children), timeout=60)
    after_kill = _unfinished_rounds(out)
    assert after_kill is not None
    assert after_kill < 30

    # Started again, then terminated (SIGTERM): one line, status 143, the cell checkpointed.
    sweep = _start_sweep(exp, out)
    children, err = _stop_when(
        sweep, lambda: after_kill + 3 <= (_unfinished_rounds(out) or 0) < 27, signal.SIGTERM
    )
    assert sweep.returncode == 143
    assert err == (
        "blazefl-fn: terminated; stopped cells keep their checkpoints: run the same command "
        "again to continue the sweep\n"
    )
    assert not any(alive(pid) for pid in children)
    logs = list(out.glob("*/stderr.log"))
    assert any(
        "terminated; checkpoint of the last completed round saved" in p.read_text() for p in logs
    )

    again = run_cli("sweep", str(exp), "--out", str(out), "--jobs", "2")
    assert again.returncode == 0, again.stderr
    assert "2 cells, 1 finished already" in again.stdout
    assert _numbers(_summary(out)) == _numbers(_summary(whole))
    for directory in _cell_dirs(whole):
        a = json.loads((directory / "result.json").read_text())
        b = json.loads((out / directory.name / "result.json").read_text())
        assert a["params_sha256"] == b["params_sha256"]
    # Every round logged exactly once after the resumes.
    for log in out.glob("*/metrics.jsonl"):
        assert [r["round"] for r in read_metrics(log)] == list(range(1, 31))


def _log(directory: Path, seed: int, accuracies: list[float], *, resumed_at: int = 0) -> None:
    """A cell's metrics log by hand: config on round 1 (and on a resumed round), wall per
    stretch, 100 bytes up and 10 down a round."""
    directory.mkdir(parents=True)
    config = {"algorithm": "fedavg", "seed": seed, "target_accuracy": 0.5, "executor": "threads"}
    lines = []
    for r, a in enumerate(accuracies, start=1):
        record: dict[str, object] = {"round": r, "eval": {"accuracy": a}}
        record |= {
            "bytes_up": 100,
            "bytes_down": 10,
            "wall": float(r if r <= resumed_at else r - resumed_at),
        }
        if r == 1 or r == resumed_at + 1:
            record["config"] = config if r == 1 else {**config, "executor": "processes"}
        lines.append(json.dumps(record))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "result.json").write_text("{}\n")


def test_summary_numbers_from_hand_made_logs(tmp_path: Path) -> None:
    from blazefl_fn.cli._sweep_summary import write_summary

    _log(tmp_path / "a", 0, [0.2, 0.6, 0.4])
    _log(tmp_path / "b", 1, [0.1, 0.3, 0.7], resumed_at=1)  # resumed on other workers
    _log(tmp_path / "c", 2, [0.1, 0.2, 0.3])
    (tmp_path / "d").mkdir()  # a cell that has not logged a round yet
    (tmp_path / "d" / "metrics.jsonl").write_text("")
    _log(tmp_path / "e", 3, [0.9])
    (tmp_path / "e" / "result.json").unlink()  # not finished: left out of the table
    rows, written = write_summary(tmp_path, ["algorithm", "seed"])
    assert [p.name for p in written][:2] == ["summary.md", "summary.csv"]
    (row,) = rows
    assert row.seeds == (0, 1, 2)
    finals = [0.4, 0.7, 0.3]
    assert row.final_mean == pytest.approx(statistics.mean(finals))
    assert row.final_std == pytest.approx(statistics.stdev(finals))
    half = 4.302652729911275 * statistics.stdev(finals) / math.sqrt(3)
    assert (row.ci_low, row.ci_high) == pytest.approx(
        (row.final_mean - half, row.final_mean + half)
    )
    assert row.best_mean == pytest.approx(statistics.mean([0.6, 0.7, 0.3]))
    assert (row.rounds_to_target, row.reached) == (2.5, 2)  # rounds 2 and 3; seed 2 never
    assert (row.bytes_up, row.bytes_down) == (300, 30)
    # Wall time adds the stretches: 3 s; 1 s + 2 s after the resume; 3 s.
    assert row.wall_seconds == pytest.approx(3.0)
    assert row.curve[1] == (
        2,
        pytest.approx(statistics.mean([0.6, 0.3, 0.2])),
        pytest.approx(statistics.stdev([0.6, 0.3, 0.2])),
    )
    md = (tmp_path / "summary.md").read_text()
    assert "| rounds to 0.5 |" in md
    assert "| 2.5 (2/3) |" in md
    assert "Not finished (not in the table): e" in md
    # No cell evaluated its clients: no per-client column.
    assert "client accuracy" not in md
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "client_accuracy" not in header
    assert header.endswith(
        "best_accuracy_mean,target_accuracy,rounds_to_target_mean,"
        "reached_target,bytes_up_mean,bytes_down_mean,wall_seconds_mean"
    )
