"""Shared test settings."""

from hypothesis import HealthCheck, settings

# The machines running this suite are shared and noisy: per-example deadlines would only
# measure the neighbours. Properties still run their full number of examples.
settings.register_profile(
    "blazefl", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("blazefl")
