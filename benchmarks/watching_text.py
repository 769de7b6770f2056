"""The watching goal in the metrics section's words: each slowdown with its interval, what a
poll costs, and the two floors that place the API's figure (a server that does next to nothing,
and the least any thread count could do under the same polls)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from benchmarks.poll_costs import PollCosts
from benchmarks.polled_counts import BLOCK_STEPS, CountsUnderPolls, least_text
from benchmarks.polled_jobs import PolledJobs
from benchmarks.stats import fmt, median_interval
from benchmarks.stream_followers import FollowedJobs

SLOWDOWN_GOAL = 0.10
SHORT_SERIES_STEPS = 10  # the job whose polls' CPU is measured without training


def placed(slowdowns: Sequence[float]) -> Literal["within", "above", "across"]:
    """Where the median of per-round slowdowns lies against the goal, by its interval
    (:func:`benchmarks.stats.median_interval`), not by the median alone: wholly within, wholly
    above, or across it (these rounds cannot tell)."""
    low, high, _ = median_interval(slowdowns)
    if high <= SLOWDOWN_GOAL:
        return "within"
    return "above" if low > SLOWDOWN_GOAL else "across"


def cold_polls_para(costs: PollCosts, default: PolledJobs) -> str:
    """What a poll costs the API paced, back to back, and while a job trains."""
    return (
        "What a poll costs the API's processes, measured before the jobs on a job of "
        f"{SHORT_SERIES_STEPS} steps, polls alternately back to back on one connection "
        f"({costs.back_to_back_hz:,.0f} polls/s) and paced as above "
        f"({costs.paced_hz:.0f} polls/s): {fmt(costs.back_to_back_ms, 'ms')} against "
        f"{fmt(costs.paced_ms, 'ms')} of CPU, {costs.paced_ms / costs.back_to_back_ms:.1f}× as "
        "much for the same request when each wakes a process that has waited a few "
        "milliseconds; while a job trains beside it (the default's row), "
        f"{fmt(default.cpu_per_poll_ms(default.api_cpu_s), 'ms')}."
    )


def floor_para(floor: PolledJobs, default: PolledJobs) -> str:
    """What the same polls take from a job when the server they poll does next to nothing, with
    these pollers on the same cores: a practical floor for this client, said beside the goal's
    verdict (which it does not change), and judged by its interval, not its median alone."""
    judged = floor_judged(
        floor,
        default.slowdown,
        adds="its CPU, its reads, the larger answers the pollers parse",
        beside="these pollers",
    )
    return (
        "The last row is a floor for this client: the same polls (the same wrk pollers on the "
        "same cores, their CPU included), the same worker and alternation, answered by a server "
        "that does next to nothing (`benchmarks/null_server.py`: Python on uvloop, the same bytes "
        "for every request, no framework, no database; "
        f"{fmt(floor.cpu_per_poll_ms(floor.api_cpu_s), 'ms')} of its CPU a poll, against the "
        f"API's {fmt(default.cpu_per_poll_ms(default.api_cpu_s), 'ms')}). Its polls slow a job "
        f"by {slowdown_cell(floor)}, the API's by {default.slowdown:+.1%}: {judged}."
    )


def crowd_floor_para(floor: FollowedJobs, crowd: FollowedJobs) -> str:
    """The same for the crowd of streams: what its streams take from a job when the server
    writes them next to nothing (what the API's streams carried, on a schedule), the client
    still on the same cores."""
    per_stream = floor.carried.chunks / floor.followed_streams
    body = floor.carried.body_bytes / floor.followed_streams
    judged = floor_judged(
        floor,
        crowd.slowdown,
        adds="its CPU: the connections' requests parsed and routed, the streams' starts, "
        "their reads, their events encoded and each write on its way through the layers",
        beside="this client",
    )
    return (
        f"The crowd's last row is its floor: the same {floor.streams} streams of each followed "
        "job (the same client on the same cores, its CPU included), the same worker and "
        "alternation, from a server that does next to nothing (`benchmarks/null_server.py`): "
        "each stream its head and, in chunks as many and as large as the API's streams' in all "
        f"on average ({per_stream:.1f} chunks, {body / 1000:.1f} kB), the first at once and the "
        f"rest at even intervals over a job's time left alone ({fmt(crowd.quiet.median, 's')}), "
        "each of them written to all of a job's streams in one callback; nothing read, nothing "
        f"encoded, no framework; {fmt(floor.per_stream_ms(floor.api_cpu_s), 'ms')} of its CPU "
        f"per stream per job, against the API's {fmt(crowd.per_stream_ms(crowd.api_cpu_s), 'ms')}"
        f". Its streams slow a job by {slowdown_cell(floor)}, the API's by "
        f"{crowd.slowdown:+.1%}: {judged}."
    )


def floor_judged(
    floor: PolledJobs | FollowedJobs, api_slowdown: float, *, adds: str, beside: str
) -> str:
    """Which side of the goal a floor lies on, by its interval; and, where it is within and the
    API slowed the job more, that what the API ``adds`` stands between."""
    goal = f"{SLOWDOWN_GOAL:.0%}"
    where = placed(floor.paired)
    if where == "within":
        return f"its whole interval is within the {goal}: a server can meet it here" + (
            f", and what the API adds ({adds}) is what stands between"
            if api_slowdown > floor.slowdown
            else ""
        )
    if where == "above":
        return (
            f"its whole interval is above the {goal}: on these cores, with {beside} beside "
            "the job, even a server that does next to nothing misses it"
        )
    return (
        f"its interval holds the {goal}: {len(floor.paired)} rounds cannot tell whether a "
        "server that does next to nothing meets it here"
    )


def slowdown_cell(jobs: PolledJobs | FollowedJobs) -> str:
    """The paired slowdown and its interval."""
    low, high, chance = median_interval(jobs.paired)
    return f"{jobs.slowdown:+.1%} ({low:+.1%} to {high:+.1%}, {chance:.0%})"


def counts_para(api: CountsUnderPolls, null: CountsUnderPolls) -> str:
    """Whether, in the bare loop, any thread count the worker may choose keeps the API's polls
    within the goal on this machine, judged by the interval of the rounds' least."""
    goal = f"{SLOWDOWN_GOAL:.0%}"
    rounds = len(api.rounds)
    judged = {
        "within": f"in the bare loop, a count the worker may choose keeps {api.label}'s polls "
        f"within the {goal} here (the interval of the rounds' least is)",
        "above": f"in the bare loop, no count the worker may choose keeps {api.label}'s polls "
        f"within the {goal} on this machine, however well it chose (the interval of the "
        "rounds' least is above it)",
        "across": f"{rounds} rounds cannot tell whether a count the worker may choose keeps "
        f"{api.label}'s polls within the {goal} here (the interval of the rounds' least holds "
        "it)",
    }[placed(api.least.per_round)]
    return (
        "Each thread count under the same pollers, measured on the training steps themselves: "
        "one loop of the default job's steps (no evaluation, nothing stored) in the benchmark's "
        f"process, its thread count changing every {BLOCK_STEPS} steps, so that every count "
        "meets the same moment of the machine (a count's first step, an epoch's first and a "
        f"short batch are not timed); {rounds} rounds of one such loop left alone and one "
        f"polled, in alternating order, polling {api.label}, then {null.label}. The pollers ask "
        f"for the steps of a finished {SHORT_SERIES_STEPS}-step job: after their first answer "
        "each poll finds no new step, as nearly every poll of a live job does (its steps "
        "arrive a flush at a time). A round's figure is each count's mean step, every stall "
        "included; the table's, the median over the rounds (`benchmarks/polled_counts.py`). "
        "The least the polls can cost is, round by round, the fastest count under them "
        f"against the fastest left alone: {api.label}'s {least_text(api)}, {null.label}'s "
        f"{least_text(null)}: {judged}."
    )
