"""The one backoff formula: doubling from the first delay up to the cap, jitter only taken off."""

from __future__ import annotations

import pytest

from service.backoff import capped_exponential


def test_without_jitter_the_delays_double_exactly_up_to_the_cap() -> None:
    delays = [capped_exponential(0.5, 3.0, tries) for tries in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_jitter_takes_off_at_most_its_share() -> None:
    assert capped_exponential(1.0, 10.0, 2, jitter=0.5, rng=lambda: 0.0) == 2.0
    assert capped_exponential(1.0, 10.0, 2, jitter=0.5, rng=lambda: 0.999999) == pytest.approx(4.0)


def test_a_long_run_of_failures_stays_at_the_cap() -> None:
    assert capped_exponential(0.1, 5.0, 10_000) == 5.0  # no overflow, no hot loop
    assert capped_exponential(0.1, 5.0, -1) == 0.1
