"""The side-by-side benchmark (`benchmarks.compare`) runs and its report code is right.

No peer venv is needed: the smoke test runs only the bare loop and blazefl_fn at tiny sizes
(not timed), and the report tests use fabricated timing rows (they test formatting and
arithmetic, not results).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest
import torch

import blazefl_fn as fl
from benchmarks.compare import cli, common, envs, models, report
from benchmarks.compare.execute import Run
from benchmarks.compare.spec import Case, RunnerResult, Workload
from benchmarks.compare.workloads import DEFAULT, override
from blazefl_fn.models import cnn

W1 = Workload("W1", "cnn", clients=10, samples=20, epochs=1, batch_size=10, lr=0.1, rounds=2)
W0 = Workload("W0", "cnn", clients=100, samples=5, epochs=1, batch_size=5, lr=0.1, rounds=1)


def _run(loop: float, whole: float, digest: str = "d" * 64, client: float | None = None) -> Run:
    result = RunnerResult(0.0, loop, [loop], digest, client)
    return Run(startup=whole - loop, loop=loop, whole=whole, result=result)


def _row(work: Workload, p: int, label: str, loop: float, whole: float, **kw: object) -> report.Row:
    framework, mode = label.split(":")
    runs = [_run(loop, whole, **kw) for _ in range(3)]  # type: ignore[arg-type]
    return report.make_row(work, p, framework, mode, runs)


# -- the models and digests every framework shares ------------------------------------------


def test_cnn_matches_blazefl_fn_architecture() -> None:
    ours = models.cnn((3, 32, 32), 10).state_dict()
    theirs = cnn((3, 32, 32), 10).state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]
    assert str(models.cnn()) == str(cnn((3, 32, 32), 10))


def test_resnet18_has_parameters_only_and_runs() -> None:
    model = models.resnet18()
    names = set(model.state_dict())
    assert names == {n for n, _ in model.named_parameters()}  # no BatchNorm buffers
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_digest_is_blazefl_fn_digest() -> None:
    params = fl.tree.from_module(
        fl.build_module(functools.partial(cnn, (3, 32, 32), 10), fl.Key.from_seed(1))
    )
    assert common.digest(params) == fl.tree.digest(params)


# -- planning and options ---------------------------------------------------------------------


def test_the_bare_floors_flat_vector_starts_every_entry_on_64_bytes() -> None:
    from benchmarks.compare.runners import bare

    params = {n: p.detach().clone() for n, p in cnn((3, 32, 32), 10).named_parameters()}
    spec = bare._spec(params)
    flat = bare._flatten(params)
    views = bare._unflatten(flat, spec)
    assert all(v.data_ptr() % 64 == 0 for v in views.values())
    assert all(torch.equal(views[n], params[n]) for n in params)
    covered = sum(v.numel() for v in views.values())
    assert flat.numel() > covered  # padded: packed end to end, it would hold just the entries
    for view in views.values():
        view.zero_()
    assert not flat.any()  # the padding between entries holds zeros only


def test_plan_runs_sequential_only_at_p1_for_bare_and_blazefl_fn() -> None:
    work = Workload("W1", "cnn", 4, 10, 1, 5, 0.1, 1, parallelism=(1, 2))
    cases = cli.plan([work], cli.Selection(), 1, {work.data_id: "/d"})
    labels = [(c.parallelism, c.label) for c in cases]
    assert (1, "bare:sequential") in labels
    assert (1, "bare:threads") not in labels
    assert (1, "flower:ray") in labels
    assert (1, "blazefl:processes") in labels
    assert (2, "blazefl_fn:processes") in labels
    assert not any(p == 2 and label.endswith(":sequential") for p, label in labels)


def test_only_narrows_frameworks_workloads_and_modes() -> None:
    selection = cli.parse_only("W0,blazefl_fn,bare:threads", ["W1", "W0"])
    work0 = dataclasses.replace(W0, parallelism=(1, 2))
    cases = cli.plan([W1, work0], selection, 1, {W1.data_id: "/a", work0.data_id: "/b"})
    labels = {(c.workload.name, c.parallelism, c.label) for c in cases}
    assert labels == {
        ("W0", 1, "blazefl_fn:sequential"),
        ("W0", 1, "bare:threads"),
        ("W0", 2, "blazefl_fn:threads"),
        ("W0", 2, "blazefl_fn:processes"),
        ("W0", 2, "bare:threads"),
    }
    with pytest.raises(ValueError, match="unknown token"):
        cli.parse_only("W9", ["W1"])


def test_the_ray_mode_runs_only_when_named() -> None:
    work = dataclasses.replace(W1, parallelism=(2,))
    dirs = {work.data_id: "/a"}
    every = {c.label for c in cli.plan([work], cli.parse_only(None, ["W1"]), 1, dirs)}
    assert "blazefl_fn:ray" not in every
    assert "blazefl_fn:processes" in every
    named = cli.parse_only("blazefl_fn:ray,bare", ["W1"])
    labels = {c.label for c in cli.plan([work], named, 1, dirs)}
    assert labels == {"blazefl_fn:ray", "bare:threads", "bare:processes"}


def test_set_overrides_one_or_every_workload() -> None:
    out = override(DEFAULT, "W1.rounds=7")
    assert out["W1"].rounds == 7
    assert out["W0"].rounds == DEFAULT["W0"].rounds
    out = override(out, "*.lr=0.05")
    assert all(w.lr == 0.05 for w in out.values())
    assert override(DEFAULT, "W0.parallelism=1,2")["W0"].parallelism == (1, 2)
    with pytest.raises(ValueError, match=r"WORKLOAD\.FIELD"):
        override(DEFAULT, "W1.nope=1")


def test_case_round_trips_through_json() -> None:
    case = Case(W1, "flower", "ray", 2, 1, "/data")
    assert Case.from_json(case.to_json()) == case


def test_no_install_fails_clearly_when_a_peer_is_missing(tmp_path: Path) -> None:
    with pytest.raises(envs.EnvMissingError, match="--no-install"):
        envs.ensure(tmp_path, "flower", install=False, log=tmp_path / "log")


# -- the report, on fabricated rows -----------------------------------------------------------


def _fabricated() -> list[report.Row]:
    return [
        _row(W1, 1, "bare:sequential", 16.0, 18.0, client=0.08),
        _row(W1, 2, "bare:threads", 8.0, 10.0, client=0.085),
        _row(W1, 2, "bare:processes", 8.4, 12.0),
        _row(W1, 2, "blazefl_fn:threads", 8.2, 10.0),
        _row(W1, 2, "blazefl_fn:processes", 8.6, 13.0),
        _row(W1, 2, "flower:ray", 16.4, 40.0),
        _row(W0, 2, "bare:threads", 4.0, 6.0, client=0.008),
        _row(W0, 2, "blazefl_fn:threads", 4.1, 6.0),
        _row(W0, 2, "flower:ray", 30.0, 50.0),
    ]


def _w0_kinds() -> list[report.Row]:
    """W0 where the process floor is the fastest: threads must still be held to threads."""
    return [
        _row(W0, 2, "bare:threads", 4.41, 6.0, client=0.008),
        _row(W0, 2, "bare:processes", 4.02, 7.0),
        _row(W0, 2, "blazefl_fn:threads", 4.61, 6.0),
        _row(W0, 2, "blazefl_fn:processes", 4.52, 8.0),
        _row(W0, 2, "blazefl_fn:ray", 5.40, 20.0),
    ]


def test_floor_ideal_and_ratios() -> None:
    rows = _fabricated()
    assert report.floor_seconds(rows, "W1", 2) == 8.0
    assert report.floor_seconds(rows, "W1", 1) == 16.0
    # ideal from the sequential bare run: 0.08 s x 10 clients x 2 rounds / P
    assert report.ideal_seconds(rows, W1, 2) == pytest.approx(0.8)
    assert report.ideal_seconds(rows, W0, 2) == pytest.approx(0.008 * 100 / 2)
    lines = report.table_lines(rows)
    fn_threads = next(line for line in lines if "blazefl_fn:threads" in line and "| W1 |" in line)
    assert "| 8.20 |" in fn_threads
    assert "| 1.02x |" in fn_threads
    assert "yes (3 runs)" in fn_threads


def test_overhead_per_client_is_the_loop_over_the_floor_per_worker() -> None:
    rows = _fabricated()
    fn_w0 = next(r for r in rows if r.workload.name == "W0" and r.label == "blazefl_fn:threads")
    # (4.1 s - 4.0 s) x P 2 / (clients x rounds) in microseconds
    expected = 0.1 * 2 / (W0.clients * W0.rounds) * 1e6
    assert report.overhead_us(fn_w0, 4.0) == pytest.approx(expected)
    assert report.overhead_us(fn_w0, None) is None
    line = next(x for x in report.table_lines(rows) if "blazefl_fn:threads" in x and "| W0 |" in x)
    assert f"| {expected:+.0f} |" in line


def test_comparison_uses_blazefl_fns_fastest_mode() -> None:
    lines = report.comparison_lines(_fabricated())
    flower = next(line for line in lines if "| W1 |" in line and "flower:ray" in line)
    assert "8.20 (threads)" in flower
    assert f"{16.4 / 8.2:.2f}x" in flower
    assert f"{40.0 / 10.0:.2f}x" in flower


def test_targets_are_computed_from_the_rows() -> None:
    verdicts = {t.text: t.met for t in report.targets(_fabricated())}
    assert verdicts["W1 blazefl_fn threads within 1.05x of the bare threads floor"] is True
    # 8.6 / 8.4 (bare processes) = 1.024, although 8.6 / 8.0 (the fastest floor) = 1.075
    assert verdicts["W1 blazefl_fn processes within 1.05x of the bare processes floor"] is True
    assert verdicts["W1 >= 1.7x faster than Flower (round loop)"] is True  # 2.0x
    assert verdicts["W1 >= 3.0x faster than Flower (whole command)"] is True  # 4.0x
    assert verdicts["W0 >= 5x faster than Flower (round loop)"] is True  # 7.3x
    assert verdicts["W0 blazefl_fn threads within 1.05x of the bare threads floor"] is True
    # no bare process loop ran: the processes and Ray targets are not evaluated
    assert verdicts["W0 blazefl_fn processes within 1.15x of the bare processes floor"] is None
    assert verdicts["W0 blazefl_fn ray within 1.30x of the bare processes floor"] is None
    rows = _fabricated()
    rows[2] = _row(W1, 2, "bare:processes", 8.1, 12.0)  # processes: 8.6 / 8.1 = 1.062
    line = next(x for x in report.target_lines(rows) if "W1 blazefl_fn processes" in x)
    assert line.endswith("| **no** |")


def test_each_executor_is_held_to_the_floor_of_its_own_kind() -> None:
    rows = _w0_kinds()
    by_text = {t.text: t for t in report.targets(rows)}
    threads = by_text["W0 blazefl_fn threads within 1.05x of the bare threads floor"]
    processes = by_text["W0 blazefl_fn processes within 1.15x of the bare processes floor"]
    ray = by_text["W0 blazefl_fn ray within 1.30x of the bare processes floor"]
    # threads: 4.61 / 4.41 = 1.045 (met), though 4.61 / 4.02 (the fastest floor) = 1.147
    assert threads.met is True
    assert "4.61 s / 4.41 s (bare threads) = 1.045" in threads.measured
    assert "vs the fastest floor (bare processes, 4.02 s): 1.147" in threads.measured
    assert processes.met is True  # 4.52 / 4.02 = 1.124
    assert "(bare processes) = 1.124" in processes.measured
    assert ray.met is False  # 5.40 / 4.02 = 1.343
    # the per-client overhead in a target is against the same own-kind floor
    expected = (4.61 - 4.41) * 2 / (W0.clients * W0.rounds) * 1e6
    assert f"({expected:+.0f} µs/client)" in threads.measured
    assert report.own_floor_seconds(rows, "W0", 2, "ray") == (4.02, "processes")
    assert report.own_floor_seconds(rows, "W0", 2, "sequential") is None
    # the table shows both ratios, each labelled in the header
    lines = report.table_lines(rows)
    assert "| loop / fastest floor | loop / own-kind floor |" in lines[0]
    fn_threads = next(line for line in lines if "blazefl_fn:threads" in line)
    assert f"| {4.61 / 4.02:.2f}x | {4.61 / 4.41:.2f}x |" in fn_threads


def test_unstable_digests_and_failures_are_reported() -> None:
    runs = [_run(1.0, 2.0, "a" * 64), _run(1.0, 2.0, "b" * 64), Run(0, 0, 0, None, "boom")]
    row = report.make_row(W1, 2, "flower", "ray", runs)
    assert not row.stable
    assert row.errors == ("boom",)
    assert "NO (2 digests in 2 runs)" in report.table_lines([row])[2]
    failed = report.make_row(W1, 2, "blazefl", "processes", [Run(0, 0, 0, None, "exit 1")])
    assert "failed: exit 1" in report.table_lines([failed])[2]


def test_runner_result_parses_the_last_result_line() -> None:
    result = RunnerResult(1.0, 2.0, [2.0], "e" * 64, 0.1, {"x": 1})
    text = "noise\nRESULT " + json.dumps(result.__dict__) + "\n"
    assert RunnerResult.parse(text) == result
    with pytest.raises(ValueError, match="no result line"):
        RunnerResult.parse("nothing")


# -- smoke: the real runners, tiny sizes, not timed -------------------------------------------


@pytest.mark.slow
def test_compare_runs_bare_and_blazefl_fn_end_to_end(tmp_path: Path) -> None:
    rows = cli.main(
        ["--quick", "--only", "W1,bare,blazefl_fn", "--parallelism", "1,2", "--repeats", "2",
         "--set", "W1.clients=4", "--set", "W1.samples=20", "--set", "W1.batch_size=10",
         "--no-install", "--no-plot", "--out", str(tmp_path)]
    )  # fmt: skip
    labels = [(r.parallelism, r.label) for r in rows]
    assert labels == [
        (1, "bare:sequential"),
        (1, "blazefl_fn:sequential"),
        (2, "bare:threads"),
        (2, "bare:processes"),
        (2, "blazefl_fn:threads"),
        (2, "blazefl_fn:processes"),
    ]
    assert all(r.ok and r.stable and not r.errors for r in rows)
    # Each framework gives the same bits in every mode and at every P.
    assert len({r.digests[0] for r in rows if r.framework == "bare"}) == 1
    assert len({r.digests[0] for r in rows if r.framework == "blazefl_fn"}) == 1
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [r["label"] for r in data["rows"]] == [label for _, label in labels]
    assert data["rows"][0]["ideal"] is not None
    table = (tmp_path / "compare.md").read_text()
    assert "| W1 | 2 | blazefl_fn:processes |" in table


def test_library_env_puts_the_given_tree_first(tmp_path: Path) -> None:
    from benchmarks.compare.execute import REPO_ROOT, library_env

    assert library_env(None) == {}
    assert library_env(tmp_path)["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), str(REPO_ROOT)]


def test_a_run_that_imported_another_blazefl_fn_fails(tmp_path: Path) -> None:
    from benchmarks.compare.execute import imported_elsewhere

    wanted = str((tmp_path / "blazefl_fn").resolve())
    result = RunnerResult(1.0, 2.0, [2.0], "e" * 64, None, {"blazefl_fn": wanted})
    assert imported_elsewhere(Run(1.0, 2.0, 3.0, result), tmp_path).result == result
    elsewhere = dataclasses.replace(result, notes={"blazefl_fn": "/somewhere/else/blazefl_fn"})
    failed = imported_elsewhere(Run(1.0, 2.0, 3.0, elsewhere), tmp_path)
    assert failed.result is None
    assert (
        failed.error
        == f"the runner imported blazefl_fn from /somewhere/else/blazefl_fn, not {wanted}"
    )


def test_library_must_hold_the_package(tmp_path: Path) -> None:
    with pytest.raises(
        SystemExit, match=r"^compare: --library .* holds no blazefl_fn/__init__\.py$"
    ):
        cli.main(["--only", "W1,blazefl_fn", "--library", str(tmp_path), "--no-install"])


@pytest.mark.slow
def test_library_runs_blazefl_fn_from_another_tree(tmp_path: Path) -> None:
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(Path(fl.__file__).parent, tree / "blazefl_fn")
    # A checkout has its own harness too; only its package may be taken from it.
    (tree / "benchmarks").mkdir()
    (tree / "benchmarks" / "__init__.py").write_text("raise ImportError('harness from tree')\n")
    rows = cli.main(
        ["--quick", "--only", "W1,blazefl_fn:sequential", "--parallelism", "1", "--repeats", "1",
         "--set", "W1.clients=3", "--set", "W1.samples=20", "--set", "W1.batch_size=10",
         "--library", str(tree), "--no-install", "--no-plot", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    # The run checks that its runner imported the copy (else it fails naming both places).
    assert [(r.label, r.ok, r.errors) for r in rows] == [("blazefl_fn:sequential", True, ())]
