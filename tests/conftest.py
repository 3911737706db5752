"""Shared test settings."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from tools.ft_check import gil_enabled, gil_override

if TYPE_CHECKING:
    from blazefl_fn.executors import Processes

# Ray, wherever a test starts it (in this process or a child): no usage reports, and one
# authentication mode for the whole run. Ray 2.60 cannot start a session in a process whose
# earlier session used another mode (its actors die unstarted), and a private loopback
# cluster needs no tokens.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# The machines running this suite are shared and noisy: per-example deadlines would only
# measure the neighbours. Properties still run their full number of examples.
settings.register_profile(
    "blazefl", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
# CI (`.ci/run` sets CI=true) draws the same examples on every run, so that a submission is not
# failed by a counterexample that chance found there; local runs keep exploring, and every
# counterexample found becomes an `@example` of its test.
settings.register_profile("ci", parent=settings.get_profile("blazefl"), derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "blazefl")
)


# `make test-ft`: the session must run on a free-threaded CPython with the GIL off, not forced off
# (PYTHON_GIL=0 or -X gil=0 would hide an extension that needs it), and end with it still off (an
# extension without free-threading support turns it on for good when imported; with
# `filterwarnings = error` its RuntimeWarning also fails the test that imported it, by name).
REQUIRE_NO_GIL = os.environ.get("BLAZEFL_FN_REQUIRE_NO_GIL") == "1"


def pytest_configure(config: pytest.Config) -> None:
    if not REQUIRE_NO_GIL:
        return
    build = sysconfig.get_config_var("Py_GIL_DISABLED")
    if build != 1 or gil_enabled():
        raise pytest.UsageError(
            f"BLAZEFL_FN_REQUIRE_NO_GIL=1 needs a free-threaded CPython with the GIL off; "
            f"{sys.executable} has Py_GIL_DISABLED={build}, GIL enabled: {gil_enabled()} "
            "(run `make test-ft`)"
        )
    override = gil_override()
    if override is not None:
        raise pytest.UsageError(f"BLAZEFL_FN_REQUIRE_NO_GIL=1: unset {override}")


def pytest_report_header() -> str:
    build = "free-threaded" if sysconfig.get_config_var("Py_GIL_DISABLED") == 1 else "default"
    return f"CPython build: {build}, GIL enabled: {gil_enabled()}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REQUIRE_NO_GIL and gil_enabled():
        print("\nerror: the GIL was enabled during the session (see the RuntimeWarning above)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif REQUIRE_NO_GIL:
        print("\nfree-threaded check: the GIL stayed off for the whole session")


@pytest.fixture(scope="module")
def processes2() -> Iterator[Processes]:
    """One `Processes(2)` pool for a module's digest comparisons (`simulate(executor=...)`), so
    that each run does not start two interpreters of its own."""
    # Imported here: the settings above must not import torch (the free-threaded checks run
    # in `pytest_configure`, before any test module imports it).
    from blazefl_fn.executors import Processes

    with Processes(2) as pool:
        yield pool
