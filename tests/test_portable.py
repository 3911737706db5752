"""Portable numerics: one digest whatever the CPU capability and the kernel variables say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blazefl_fn import portable
from blazefl_fn.cli._commands import main
from blazefl_fn.run.checkpoint import load_checkpoint
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.metrics_log import read_metrics
from blazefl_fn.run.simulate import check_resumable

HERE = Path(__file__).parent

# Golden values: the same on every x86-64 CPU under --portable. The default job's is the
# digest the README shows for `make run ARGS=--portable`.
DEFAULT_JOB = "019136b63ab3387d374fb00e5b8cc997cebddcad382389c4fc46c68ab262cb95"
CNN_JOB = "01b067db8776ba4c58e1dd81d05b2e0468d9815b0a1eac3b3b4ad4b4439c75d7"


def _capabilities() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ["default", "avx2"] + (["avx512"] if "avx512f" in flags else [])


def _env(capability: str) -> dict[str, str]:
    # The user's environment asks for native kernels everywhere; the mode must override it.
    conflicting = {
        "ATEN_CPU_CAPABILITY": capability,
        "MKL_CBWR": "AVX2",
        "MKL_DYNAMIC": "TRUE",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    return {**os.environ, **conflicting}


def _cli_digest(capability: str, executor: str) -> str:
    argv = [sys.executable, "-m", "blazefl_fn", "run", "--json", "--quiet", "--portable",
            "--executor", executor]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, check=False, env=_env(capability)
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["portable"] is True
    assert result["cpu_capability"] == "DEFAULT"
    return str(result["params_sha256"])


def _cnn_digest(capability: str, executor: str) -> str:
    argv = [sys.executable, str(HERE / "_portable_job.py"), executor, "--portable"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, check=False, env=_env(capability)
    )
    assert done.returncode == 0, done.stderr
    digest, capability_used = done.stdout.split()
    assert capability_used == "DEFAULT"
    return digest


def _cells() -> list[tuple[str, str]]:
    """A covering set of (executor, ATen capability the environment asks for): every executor
    and every capability of this CPU once, the worker processes under a non-baseline one (their
    pins come from the driver's environment: under ``default`` a lost pin would not show)."""
    capabilities = _capabilities()
    threads = capabilities[2] if len(capabilities) > 2 else "avx2"
    return [("sequential", "default"), ("processes", "avx2"), ("threads", threads)]


@pytest.mark.slow
@pytest.mark.parametrize(("executor", "capability"), _cells())
def test_portable_runs_give_the_golden_digests_whatever_the_environment(
    executor: str, capability: str
) -> None:
    assert _cli_digest(capability, executor) == DEFAULT_JOB
    assert _cnn_digest(capability, executor) == CNN_JOB


@pytest.mark.slow
def test_native_runs_differ_by_capability_so_the_pins_matter() -> None:
    # Without --portable the bits follow the CPU capability (what the mode exists to fix).
    digests = set()
    for capability in ("default", "avx2"):
        argv = [sys.executable, str(HERE / "_portable_job.py"), "sequential"]
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        digests.add(done.stdout.split()[0])
    assert len(digests) == 2
    assert CNN_JOB not in digests


def test_pins_override_the_environment() -> None:
    env = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "PATH": "/bin"}
    pinned = portable.with_pins(env)
    assert portable.pinned(pinned)
    assert not portable.pinned(env)
    assert pinned["PATH"] == "/bin"
    assert pinned["ATEN_CPU_CAPABILITY"] == "default"


def test_enable_after_a_kernel_ran_is_refused_with_instructions() -> None:
    code = (
        "import os, torch; torch.ones(4).add(1)\n"
        "from blazefl_fn import portable\n"
        "try:\n    portable.enable()\nexcept RuntimeError as e:\n    print(e)\n"
        "print(os.environ.get('MKL_CBWR'), os.environ.get('ONEDNN_MAX_CPU_ISA'))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    message, restored = done.stdout.strip().splitlines()
    assert "must be enabled before torch runs its first kernel" in message
    assert "already uses AVX2 kernels" in message
    assert "ATEN_CPU_CAPABILITY=default" in message
    # Refused: the environment is as it was, so later workers are not pinned behind our back.
    assert restored == "AVX2 None"


def test_cli_in_process_portable_after_a_kernel_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    torch.ones(2).add(1)  # this (test) process has run kernels: too late to pin it
    before = {name: os.environ.get(name) for name in portable.PINS}
    assert main(["run", "--portable", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blazefl-fn: error: portable numerics must be enabled before")
    assert len(err.strip().splitlines()) == 1
    assert {name: os.environ.get(name) for name in portable.PINS} == before


def test_resume_refuses_to_mix_portable_and_native() -> None:
    with pytest.raises(ValueError, match=r"portable=False \(requested True\)"):
        check_resumable(RunConfig(), RunConfig(portable=True))
    with pytest.raises(ValueError, match=r"portable=True \(requested False\)"):
        check_resumable(RunConfig(portable=True), RunConfig())


def test_json_metrics_and_checkpoint_record_the_numerics(tmp_path: Path) -> None:
    metrics, checkpoint = tmp_path / "m.jsonl", tmp_path / "ck"
    # Through the console script this time (the golden tests use python -m blazefl_fn).
    script = Path(sys.executable).parent / "blazefl-fn"
    argv = [str(script), "run", "--json", "--quiet", "--portable",
            "--rounds", "2", "--metrics", str(metrics),
            "--checkpoint-dir", str(checkpoint)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    recorded = {"portable": True, "cpu_capability": "DEFAULT"}
    assert {k: result[k] for k in recorded} == recorded
    assert all(r["numerics"] == recorded for r in read_metrics(metrics))
    loaded = load_checkpoint(checkpoint)
    assert dict(loaded.numerics) == recorded
    assert loaded.config["portable"] is True


def test_a_native_run_records_its_capability(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--json", "--quiet", "--rounds", "1", "--clients", "4",
                 "--clients-per-round", "2"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["portable"] is False
    assert result["cpu_capability"] == portable.cpu_capability()
