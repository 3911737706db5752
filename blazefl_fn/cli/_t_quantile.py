"""The two-sided quantile of Student's t, for the 95% intervals of a sweep's summary (no
scipy: the distribution function is exact for integer degrees of freedom)."""

from __future__ import annotations

import math

__all__ = ["t_quantile"]


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` degrees of freedom (Abramowitz & Stegun 26.7.3-4,
    exact for integer ``df``)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2 == 1:
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inner = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + inner)
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom.

    Args:
        df: degrees of freedom (>= 1).
        level: the interval's coverage, in (0, 1).

    Returns:
        ``t`` with P(|T| < t) = ``level`` (12.706 for df 1, 4.303 for df 2 at 95%).
    """
    low, high = 0.0, 1.0
    while _t_two_sided(high, df) < level:
        high *= 2
    for _ in range(200):  # bisection to float precision
        mid = (low + high) / 2
        if _t_two_sided(mid, df) < level:
            low = mid
        else:
            high = mid
    return (low + high) / 2
