"""The benchmark scripts run and agree with themselves (timings are not tested here)."""

from __future__ import annotations

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
