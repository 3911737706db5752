"""The examples run, and say what they claim."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

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
