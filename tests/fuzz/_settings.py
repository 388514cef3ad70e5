"""The bounded, reproducible hypothesis profile of the fuzz suites."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def fuzz(max_examples: int) -> settings:
    """Derandomized (the same examples on every run, CI included), no example database,
    no deadline; the generators may be slow or filter much."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
