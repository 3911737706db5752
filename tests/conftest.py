"""Shared test settings."""

import os

from hypothesis import HealthCheck, settings

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
settings.load_profile("blazefl")
