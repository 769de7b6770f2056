"""The watching goal's words (benchmarks/watching_text.py): where a median of rounds lies against
the goal, and whether any thread count could meet it under the polls."""

from __future__ import annotations

from benchmarks.polled_counts import CountsRound, CountsUnderPolls
from benchmarks.watching_text import counts_para, placed


def test_a_median_is_placed_by_its_interval_not_by_itself() -> None:
    assert placed([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]) == "within"
    assert placed([0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17]) == "above"
    # The median (+8%) is within; the interval of seven rounds holds the goal.
    assert placed([0.01, 0.02, 0.05, 0.08, 0.12, 0.15, 0.20]) == "across"


def under_polls(label: str, least: list[float]) -> CountsUnderPolls:
    """Rounds in which one thread is 1 ms a step alone and two 0.8 ms, and the fastest polled
    count's steps take ``least`` longer than two threads' alone."""
    return CountsUnderPolls(
        label,
        [
            CountsRound({1: [1.0e-3], 2: [0.8e-3]}, {1: [2e-3], 2: [0.8e-3 * (1 + x)]}, 200.0)
            for x in least
        ],
    )


def test_the_paragraph_says_whether_any_count_could_meet_the_goal() -> None:
    null = under_polls("the null server", [0.05] * 7)
    above = counts_para(under_polls("the API", [0.15] * 7), null)
    assert "no count the worker may choose keeps the API's polls within the 10%" in above
    assert "the API's +15.0% (fastest under the polls: 2 threads in 7 of 7 rounds)" in above
    assert "the null server's +5.0%" in above
    within = counts_para(under_polls("the API", [0.05] * 7), null)
    assert "a count the worker may choose keeps the API's polls within the 10% here" in within
    across = counts_para(under_polls("the API", [0.0, 0.05, 0.08, 0.09, 0.12, 0.15, 0.2]), null)
    assert "7 rounds cannot tell whether a count" in across
