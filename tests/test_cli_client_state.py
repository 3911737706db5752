"""`blazefl-fn run` with the client-state store's flags: spilling changes no bit, a spilled run
resumes bitwise, nothing is left in the spill directory, and bad values exit 2 in one line."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest
from _cli import Run, run_inline

QUICK = ["--algorithm", "scaffold", "--clients", "12", "--clients-per-round", "4", "--quiet"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """The command with QUICK's flags, in this process (a real process's one-line status is
    `tests/test_cli_errors.py`'s)."""
    return functools.partial(run_inline, capsys, "run", *QUICK)


def _digest(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["params_sha256"]


@pytest.mark.parametrize("algorithm", ["scaffold", "feddyn"])
def test_a_spilled_run_gives_the_same_bits_and_resumes_bitwise(
    cli: Run, algorithm: str, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    flags = ["--algorithm", algorithm, "--json"]
    spilled = ["--client-state-memory-mb", "0", "--client-state-dir", str(spill)]
    whole = _digest(cli(*flags, "--rounds", "6"))
    ckpt = tmp_path / "ckpt"
    first = cli(*flags, *spilled, "--rounds", "3", "--checkpoint-dir", str(ckpt))
    _digest(first)
    resumed = cli(*flags, *spilled, "--rounds", "6", "--resume", str(ckpt))
    assert _digest(resumed) == whole
    # Every spill file and the run's private spill directory are gone with the run.
    assert list(spill.iterdir()) == []
    # The budget and the directory may change on resume (the first may be gone): neither
    # changes the bits.
    spill.rmdir()
    gone = cli(*flags, "--rounds", "6", "--resume", str(ckpt))
    assert gone.returncode == 1
    assert gone.stderr == f"blazefl-fn: error: client_state_dir {str(spill)!r} is not a directory\n"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = cli(*flags, "--client-state-memory-mb", "0", "--client-state-dir", str(elsewhere),
                 "--rounds", "6", "--resume", str(ckpt))  # fmt: skip
    assert _digest(again) == whole
    assert list(elsewhere.iterdir()) == []


def test_a_missing_client_state_dir_is_a_file_problem_exit_1(cli: Run) -> None:
    done = cli("--rounds", "1", "--client-state-dir", "/nonexistent/blazefl")
    assert done.returncode == 1
    assert done.stderr == (
        "blazefl-fn: error: client_state_dir '/nonexistent/blazefl' is not a directory\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--client-state-memory-mb", "-1"], "client_state_memory_mb must be"),
        (["--client-state-memory-mb", "10000001"], "client_state_memory_mb must be"),
        (["--client-state-memory-mb", "1.5"], "invalid int value"),
        (["--algorithm", "fedavg", "--client-state-memory-mb", "8"], "applies to the algorithms"),
        (["--algorithm", "fedprox", "--client-state-dir", "/tmp"], "applies to the algorithms"),
    ],
)
def test_bad_client_state_flags_exit_2_in_one_line(
    cli: Run, flags: list[str], message: str
) -> None:
    done = cli("--rounds", "1", *flags)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
