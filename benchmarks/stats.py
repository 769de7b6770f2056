"""Small statistics for benchmark figures: medians of repeated runs, percentiles, ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def median(values: Sequence[float]) -> float:
    """The median of at least one value."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0–100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``; infinite when the baseline is zero."""
    return value / baseline if baseline else math.inf


@dataclass
class Series:
    """The repeated measurements of one figure, in ``unit``; the figure is their median."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        """Record one run."""
        self.values.append(value)

    @property
    def median(self) -> float:
        """The figure: the median of the runs."""
        return median(self.values)

    @property
    def spread(self) -> tuple[float, float]:
        """The fastest and slowest run (min, max)."""
        return min(self.values), max(self.values)


def fmt(value: float, unit: str = "") -> str:
    """A number with about three significant digits, and its unit."""
    if math.isinf(value) or math.isnan(value):
        text = str(value)
    elif value == 0:
        text = "0"
    else:
        digits = max(0, 2 - math.floor(math.log10(abs(value))))
        text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def fmt_ratio(value: float) -> str:
    """A ratio as ``1.07×``."""
    return f"{value:.2f}×"


def verdict(ok: bool) -> str:
    """How a goal's row says whether it is met."""
    return "met" if ok else "**not met**"


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values`` and the chance it holds it.

    The ``k``-th smallest and ``k``-th largest value, ``k`` the largest for which a
    Binomial(n, ½) falls below ``k`` with at most half of ``1 - confidence``: the interval
    holds the median with at least ``confidence``, whatever the values' distribution. With
    too few values for that (fewer than 6 at 95%) it is the smallest and the largest, and the
    chance returned is below ``confidence``.
    """
    if not values:
        raise ValueError("interval of no values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is outside (0, 1)")
    ordered = sorted(values)
    n = len(ordered)
    below = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(Binomial(n, ½) = i)
    k, tail = 1, below[0]  # tail: P(Binomial < k)
    while k < n - k + 1 and 2 * (tail + below[k]) <= 1 - confidence:
        tail += below[k]
        k += 1
    return ordered[k - 1], ordered[n - k], 1 - 2 * tail
