"""The examples run, and say what they claim."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from _paths import mnist_dir, mnist_search_path

MNIST = mnist_dir()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_server_learning_rate_example(capsys: pytest.CaptureFixture[str]) -> None:
    example = _load("server_learning_rate")
    same = example.main(["--rounds", "3", "--server-lr", "1"])
    assert same["fedavg"] == same["fedavg+server-lr"]
    different = example.main(["--rounds", "3", "--server-lr", "0.5"])
    assert different["fedavg"] == same["fedavg"]
    assert different["fedavg+server-lr"] != same["fedavg+server-lr"]
    assert "accuracy" in capsys.readouterr().out


def test_robust_pipeline_example_survives_the_attack(capsys: pytest.CaptureFixture[str]) -> None:
    example = _load("robust_pipeline")
    accuracy = example.main(["--rounds", "15"])
    assert accuracy["median"] > accuracy["mean"] + 0.05
    assert accuracy["clip+trimmed+momentum"] > accuracy["mean"] + 0.03
    assert "accuracy under attack" in capsys.readouterr().out


@pytest.mark.skipif(MNIST is None, reason=f"MNIST not found at {mnist_search_path()}")
def test_dsfl_vs_scarlet_example_reports_fewer_bytes_for_scarlet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load("dsfl_vs_scarlet")
    out = tmp_path / "table.md"
    args = [
        "--data-dir", str(MNIST), "--rounds", "4", "--clients", "20", "--clients-per-round",
        "4", "--public-size", "200", "--public-per-round", "100", "--cache-duration", "3",
        "--kd-epochs", "1", "--executor", "sequential", "--every", "1", "--markdown", str(out),
    ]  # fmt: skip
    traces = example.main(args)
    dsfl, scarlet = traces["dsfl"][-1], traces["scarlet"][-1]
    assert [r["round"] for r in traces["scarlet"]] == [1, 2, 3, 4]
    # Cached labels are neither requested again nor resent.
    assert scarlet["up"] < dsfl["up"]
    assert scarlet["down"] + scarlet["up"] < dsfl["down"] + dsfl["up"]
    # Round 1 has no cache yet: both upload the same 100 soft labels from each of 4 clients.
    assert traces["scarlet"][0]["up"] == traces["dsfl"][0]["up"] == 4 * 100 * 10 * 4
    text = capsys.readouterr().out
    assert "MB total" in text
    assert out.read_text(encoding="utf-8").strip() == text.strip()


def test_scaffold_from_stages_is_the_shipped_scaffold(capsys: pytest.CaptureFixture[str]) -> None:
    example = _load("scaffold_from_stages")
    digests = example.main(["--rounds", "4"])
    assert digests["my-scaffold"] == digests["fl.scaffold"]
    assert "params_sha256" in capsys.readouterr().out


@pytest.mark.skipif(MNIST is None, reason=f"MNIST not found at {mnist_search_path()}")
def test_dp_mnist_example_reports_the_accountants_epsilon_per_noise_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("opacus.accountants")
    from blazefl_fn.privacy.privatize import Accountant

    example = _load("dp_mnist")
    out = tmp_path / "table.md"
    rows = example.main(
        ["--data-dir", str(MNIST), "--rounds", "3", "--clients", "200", "--clients-per-round",
         "20", "--noise", "0.8", "3", "--executor", "sequential", "--markdown", str(out)]
    )  # fmt: skip
    assert list(rows) == ["no DP", "z=0.8", "z=3"]
    assert rows["no DP"]["epsilon"] is None
    for z in (0.8, 3.0):
        assert rows[f"z={z:g}"]["epsilon"] == Accountant(z, 0.1, 1e-5).epsilon(3)
    assert rows["z=3"]["epsilon"] < rows["z=0.8"]["epsilon"]
    assert out.read_text(encoding="utf-8").strip() == capsys.readouterr().out.strip()
