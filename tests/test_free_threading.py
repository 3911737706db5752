"""The free-threading check (`tools/ft_check.py`, run by `make ft-env` and `make test-ft`): it
refuses an interpreter with the GIL, passes with the GIL off, and names an extension module that
turns the GIL back on. The tests that need a free-threaded CPython run under `make test-ft`."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "ft_check.py"
FREE_THREADED = sysconfig.get_config_var("Py_GIL_DISABLED") == 1
needs_free_threading = pytest.mark.skipif(
    not FREE_THREADED, reason="needs a free-threaded CPython: run `make test-ft`"
)

# An extension module that does not declare free-threading support (no Py_mod_gil slot):
# importing it turns the GIL on for the rest of the process.
NEEDS_GIL_C = """
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "needs_gil", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_needs_gil(void) { return PyModule_Create(&def); }
"""


def _check(*modules: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), *modules], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


@pytest.mark.skipif(FREE_THREADED, reason="this interpreter is free-threaded")
def test_the_check_refuses_an_interpreter_with_the_gil() -> None:
    done = _check()
    assert done.returncode == 1
    assert done.stderr.strip() == f"ft-check: {sys.executable} is not a free-threaded build"


@needs_free_threading
def test_the_check_passes_with_the_gil_off() -> None:
    done = _check()
    assert done.returncode == 0, done.stderr
    assert "sys._is_gil_enabled() = False" in done.stdout


@needs_free_threading
def test_the_check_refuses_python_gil_overrides() -> None:
    done = _check(env={"PYTHON_GIL": "0"})
    assert done.returncode == 1
    assert "unset PYTHON_GIL" in done.stderr


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _build_needs_gil(directory: Path) -> None:
    """Compile `NEEDS_GIL_C` into ``directory`` as the module ``needs_gil``."""
    source = directory / "needs_gil.c"
    source.write_text(NEEDS_GIL_C)
    target = directory / f"needs_gil{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(target)], check=True
    )


@needs_free_threading
@needs_gcc
def test_the_check_names_an_extension_that_turns_the_gil_on(tmp_path: Path) -> None:
    _build_needs_gil(tmp_path)
    done = _check("needs_gil", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1
    assert "the GIL was enabled while importing 'needs_gil'" in done.stderr
    assert "has not declared that it can run safely without the GIL" in done.stderr


# Enters `cuda_determinism` in a fresh interpreter (no inductor loaded yet) and reports.
_DETERMINISM_PROBE = """
import sys, torch
from blazefl_fn.executors.devices import cuda_determinism
# A previous setting to restore (set as cuda_determinism would: torch's own call imports inductor).
torch._C._set_deterministic_algorithms(False, warn_only=True)
with cuda_determinism():
    inside = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    inductor = sys.modules.get("torch._inductor.config")
    compiled = None if inductor is None else inductor.deterministic
print(inside, warn, compiled, torch.are_deterministic_algorithms_enabled(),
      torch.is_deterministic_algorithms_warn_only_enabled(),
      getattr(sys, "_is_gil_enabled", lambda: True)())
"""


def test_cuda_determinism_switches_kernels_without_turning_the_gil_on() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _DETERMINISM_PROBE], capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    inside, warn, compiled, after, warn_after, gil = done.stdout.split()
    assert (inside, warn, after, warn_after) == ("True", "False", "False", "True")
    if FREE_THREADED:
        # The public call would import inductor, then triton, whose extension needs the GIL.
        assert (compiled, gil) == ("None", "False")
    else:
        assert (compiled, gil) == ("True", "True")  # torch's own call, inductor's option too


def _session(tmp_path: Path, test: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A pytest session over one test file, with this suite's conftest as its plugin."""
    (tmp_path / "test_probe.py").write_text(test)
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT), str(tmp_path)])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-p", "no:cacheprovider",
         "-W", "error::RuntimeWarning", "--rootdir", str(tmp_path), "test_probe.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": path, "BLAZEFL_FN_REQUIRE_NO_GIL": "1", **env},
    )  # fmt: skip


@pytest.mark.skipif(FREE_THREADED, reason="this interpreter is free-threaded")
def test_a_required_free_threaded_session_refuses_to_start_with_the_gil(tmp_path: Path) -> None:
    done = _session(tmp_path, "def test_nothing() -> None:\n    pass\n", {})
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "BLAZEFL_FN_REQUIRE_NO_GIL=1 needs a free-threaded CPython" in done.stderr


@needs_free_threading
def test_a_required_free_threaded_session_refuses_a_forced_gil_mode(tmp_path: Path) -> None:
    done = _session(tmp_path, "def test_nothing() -> None:\n    pass\n", {"PYTHON_GIL": "0"})
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "unset PYTHON_GIL=0" in done.stderr


@needs_free_threading
@needs_gcc
def test_a_session_that_turns_the_gil_on_fails_and_names_the_module(tmp_path: Path) -> None:
    _build_needs_gil(tmp_path)
    done = _session(tmp_path, "def test_import() -> None:\n    import needs_gil  # noqa\n", {})
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "to load module 'needs_gil'" in done.stdout
    assert "error: the GIL was enabled during the session" in done.stdout


@needs_free_threading
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the guide's claim is about triton"
)
def test_torch_optim_turns_the_gil_on_through_triton_and_not_without_it() -> None:
    # What the guide tells users (torch 2.12.0, cp313t); this fails once upstream fixes it.
    probe = (
        "import sys\n{block}\nimport torch\n"
        "m = torch.nn.Linear(2, 2)\no = torch.optim.Adam(m.parameters())\n"
        "m(torch.ones(1, 2)).sum().backward()\no.step()\nprint(sys._is_gil_enabled())\n"
    )
    outputs = []
    for block in ("", "sys.modules['triton'] = None  # as if triton were not installed"):
        done = subprocess.run(
            [sys.executable, "-c", probe.format(block=block)], capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.strip())
    assert outputs == ["True", "False"]
