"""The benchmark scripts run and agree with themselves (timings are not tested here)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchmarks import executors as bench


@pytest.mark.slow
def test_executor_benchmark_runs_and_every_configuration_gives_one_digest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = bench.main(
        ["--clients", "4", "--samples", "20", "--rounds", "2", "--repeats", "2",
         "--configs", "sequential:1,threads:2,processes:2"]
    )  # fmt: skip
    assert [(r.executor, r.workers) for r in rows] == [
        ("sequential", 1),
        ("threads", 2),
        ("processes", 2),
    ]
    assert len({r.digest for r in rows}) == 1
    assert all(r.median_round_seconds > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| processes | 2 |" in out
    assert "digests identical across configurations: yes" in out


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_finds_one_digest_per_case(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import gpu_check

    status = gpu_check.main(
        ["--device", "cpu", "--tiny", "--repeats", "1",
         "--executors", "sequential:1,processes:2", "--algorithms", "scarlet",
         "--vectorized", "synthetic"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert "W1: one digest on the device: yes (1)" in out
    assert "resnet18: one digest on the device: yes (1)" in out
    assert "| scarlet |" in out
    assert "| NO |" not in out
    assert "| synthetic | vectorized:all |" in out
    assert "gpu_check: OK" in out


def test_vectorized_benchmark_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import vectorized

    status = vectorized.main(
        ["--tiny", "--repeats", "2", "--cases", "W1,synthetic",
         "--executors", "sequential,threads:2,vectorized:3,vectorized:all"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    for row in ("| W1 | sequential | ", "| W1 | vectorized:3 | ", "| synthetic | threads:2 | "):
        assert row in out
    assert "NOT repeatable" not in out
    assert "vectorized: OK" in out


def test_gpu_check_refuses_a_device_this_machine_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import gpu_check

    assert gpu_check.main(["--device", "tpu"]) == 2
    assert "gpu_check: error: malformed device 'tpu'" in capsys.readouterr().err


@pytest.mark.slow
def test_portable_benchmark_prints_both_modes(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import portable

    assert portable.main(["--clients", "2", "--samples", "20", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "| sequential | native |" in out
    assert "| sequential | portable | DEFAULT |" in out


@pytest.mark.slow
def test_scale_benchmark_runs_every_part_with_one_digest_per_federation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from _paths import mnist_dir

    from benchmarks import scale

    data_dir = mnist_dir()
    if data_dir is None:
        pytest.skip("MNIST is not available")
    results = scale.main(
        ["--sizes", "100,5000", "--per-round", "4", "--rounds", "2",
         "--stateful-clients", "300", "--long-rounds", "40", "--data-dir", str(data_dir),
         "--algorithms", "scaffold,scarlet", "--store-memory-mb", "0"]
    )  # fmt: skip
    out = capsys.readouterr().out
    synthetic = results["synthetic"]
    assert [(r["clients"], r["executor"]) for r in synthetic] == [
        (100, "threads"), (5000, "threads"), (100, "processes"), (5000, "processes"),
    ]  # fmt: skip
    # Threads and processes compute the same bits for each federation; federations differ.
    digests = {(r["clients"], r["executor"]): r["digest"] for r in synthetic}
    assert digests[100, "threads"] == digests[100, "processes"]
    assert digests[5000, "threads"] == digests[5000, "processes"]
    assert digests[100, "threads"] != digests[5000, "threads"]
    assert all(r["worker_peak_mib"] > 0 for r in synthetic if r["executor"] == "processes")
    for row in results["stateful"]:
        # Only the clients that took part hold state, and a budget of 0 spills all of it.
        assert 4 <= row["stored_clients"] <= 2 * 4
        assert row["store_memory_mib"] == 0
        assert row["store_spilled_mib"] > 0
    assert [r["executor"] for r in results["long"]] == ["sequential", "processes"]
    # A 40-round long part reads memory at rounds 10 (a quarter), 20 and 40.
    assert all(
        {"driver_mib_10", "driver_mib_20", "driver_mib_40"} <= set(r) for r in results["long"]
    )
    assert "| scarlet | 0 | 300 |" in out


def test_scale_benchmark_refuses_a_long_part_too_short_for_its_readings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import scale

    with pytest.raises(SystemExit) as exit_info:
        scale.main(["--parts", "long", "--long-rounds", "3"])
    assert exit_info.value.code == 2
    assert "--long-rounds must be at least 4 (three readings), got 3" in capsys.readouterr().err


def test_free_threading_table_gives_ratios_and_catches_digests_that_differ(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pathlib import Path

    from benchmarks import free_threading as ft
    from benchmarks.compare.workloads import QUICK

    names = ("3.11", "ft", "ft+GIL")
    interpreters = [ft.Interpreter(n, Path("/x"), {}) for n in names]
    # Seconds: bare 10 (P1) / 5 (P2) everywhere but ft P2 = 4; blazefl_fn 12 / 6, ft 12 / 4.
    seconds = {("bare", 1): (10, 10, 10), ("bare", 2): (5, 4, 5),
               ("blazefl_fn", 1): (12, 12, 12), ("blazefl_fn", 2): (6, 4, 6)}  # fmt: skip
    cells = {
        ("W0", runner, p, n): ft.Cell(float(s), frozenset({f"{runner}-{n == '3.11'}"}))
        for (runner, p), row in seconds.items()
        for n, s in zip(names, row, strict=True)
    }
    assert ft.print_table(cells, [QUICK["W0"]], interpreters)
    out = capsys.readouterr().out
    # ft / 3.11, ft / ft+GIL, P2 speed-ups per interpreter, fn / bare per interpreter.
    cols = ["W0", "blazefl_fn", "2", "6.00", "4.00", "6.00", "0.67x", "0.67x", "2.00x", "3.00x",
            "2.00x", "1.20x", "1.00x", "1.20x"]  # fmt: skip
    assert "| " + " | ".join(cols) + " |" in out
    assert "W0 bare on ft/ft+GIL: one digest" in out

    cells["W0", "bare", 2, "ft+GIL"] = ft.Cell(5.0, frozenset({"other"}))
    assert not ft.print_table(cells, [QUICK["W0"]], interpreters)
    assert "W0 bare on ft/ft+GIL: DIGESTS DIFFER" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--workloads", "W1,W9"], "--workloads takes W1 and/or W0, got 'W1,W9'"),
        (["--ft-python", "/nonexistent/python"], "no interpreter at /nonexistent/python"),
    ],
)
def test_free_threading_refuses_bad_arguments(argv: list[str], message: str) -> None:
    import sys

    from benchmarks import free_threading as ft

    with pytest.raises(SystemExit, match=message):
        ft.main(["--python", sys.executable, *argv])


def test_streams_benchmark_prints_both_parts(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import streams

    assert streams.main(["--tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "streams version 2" in out
    assert "| streams version 1 (manual_seed, 32 bits) | " in out
    assert "| Key.torch_generator (streams version 2) | " in out
    assert "| W0 round (sequential) | " in out


def test_streams_benchmark_refuses_an_unknown_part() -> None:
    from benchmarks import streams

    with pytest.raises(SystemExit) as info:
        streams.main(["--parts", "round,nope"])
    assert info.value.code == 2


def test_lazy_benchmark_times_both_passes_over_the_same_clients(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import lazy

    rows = lazy.run(clients=50, per_round=5, rounds=3)  # asserts the two passes' bits agree
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["examples"] > 0 and r["lazy_s"] > 0 and r["ready_s"] > 0 for r in rows)
    assert lazy.main(["--clients", "50", "--per-round", "5", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | " in out
    assert "| 0 | " not in out  # the first round is left out
    assert "bits: the same in both passes of every round" in out


def _refusal(
    main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> str:
    """The last stderr line of a benchmark script refusing ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "1"], "--rounds must be at least 2"),
        (["--clients", "0"], "--clients must be at least 1"),
        (["--clients", "10", "--per-round", "11"], "--per-round must be in [1, --clients]"),
        (["--per-round", "0"], "--per-round must be in [1, --clients]"),
    ],
)
def test_lazy_benchmark_refuses_bad_sizes_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import lazy

    assert message in _refusal(lazy.main, argv, capsys)


def test_overhead_benchmark_prints_its_three_tables(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from benchmarks import overhead

    threads = torch.get_num_threads()
    try:
        overhead.main(["--clients", "3"])  # a script: it sets this process's threads to 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| part of one client's update (median of 3, timed in the loop) |" in out
    assert "| **around the step and the gather (sum)** |" in out
    assert "| round machinery, 1000 clients |" in out
    for executor in ("Sequential()", "Threads(2)", "Processes(2)"):
        assert f"| {executor} | " in out


def test_overhead_benchmark_refuses_no_clients(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import overhead

    last = _refusal(overhead.main, ["--clients", "0"], capsys)
    assert "--clients must be at least 1, got 0" in last


def test_round_phases_add_up_to_the_round_and_time_every_client() -> None:
    import torch

    from benchmarks import round_phases

    threads = torch.get_num_threads()
    try:  # a script's case: it sets this process's threads to 1
        fn = [round_phases._case("blazefl_fn", "threads", 4, 2) for _ in range(2)]
        floor = round_phases._case("bare", "sequential", 4, 2)
    finally:
        torch.set_num_threads(threads)
    for row in (*fn, floor):
        phases = row["head_ms"] / 1e3 + row["map_s"] + row["tail_ms"] / 1e3
        assert phases == pytest.approx(row["round_s"], rel=1e-9)
        assert row["head_ms"] >= 0
        assert row["tail_ms"] > 0
        assert row["cpu_us"] > 0
        assert 0 < row["update_us"] < 1e6 * row["map_s"]
    assert fn[0]["digest"] == fn[1]["digest"]  # the timer leaves the round's bits alone


@pytest.mark.slow
def test_round_phases_prints_both_kinds_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import round_phases

    assert round_phases.main(["--clients", "3", "--repeats", "1", "--modes", "sequential"]) == 0
    out = capsys.readouterr().out
    assert "| bare:sequential | " in out
    assert "| blazefl_fn:sequential | " in out
    assert "digests differ" not in out
    assert "sequential: blazefl_fn / bare " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clients", "0"], "--clients must be at least 1, got 0"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--workers", "-1"], "--workers must be at least 1, got -1"),
        (["--modes", "threads,processes"], "--modes takes threads, sequential; got 'processes'"),
        (["--modes", ","], "--modes takes threads, sequential; got ','"),
    ],
)
def test_round_phases_refuses_bad_arguments_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import round_phases

    assert message in _refusal(round_phases.main, argv, capsys)
