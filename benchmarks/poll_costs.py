"""What a poll costs the API's processes, sent back to back and paced as a chart polls, and what
the polls' CPU alone would take from a job that kept every core busy.

A live chart's polls come a few milliseconds apart, and each wakes an API process whose caches
and branch predictors the interval has let go cold: measured on this host's two cores, such a
poll took the API two to three times the CPU of the same poll sent as soon as the previous one was
answered (docs/benchmarks.md). Both figures come from one run, alternated, so that they are
compared on one host's speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks.procs import children, exact_cpu_seconds
from benchmarks.series_clients import Poller

BACK_TO_BACK_HZ = 1e6  # a rate no connection reaches: each poll goes as the last is answered


@dataclass
class PollCosts:
    """The API's CPU per poll, both ways, summed over every round."""

    back_to_back_ms: float
    back_to_back_hz: float  # polls a second one connection reached
    paced_ms: float
    paced_hz: float


def api_cpu_s(pid: int) -> float:
    """CPU seconds of the API's processes (the server and its workers), to the nanosecond."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            total += exact_cpu_seconds(p)
        except ProcessLookupError:
            continue  # a process that ended since it was listed
    return total


def _polled(
    url: str, pid: int, job_id: str, rate_hz: float, connections: int, seconds: float
) -> tuple[float, int, float]:
    """Poll for ``seconds``: the API's CPU seconds, the polls answered, the pollers' rate."""
    with Poller(url, job_id, rate_hz, connections) as poller:
        before = api_cpu_s(pid)
        time.sleep(seconds)
        polls = poller.stop()
        return api_cpu_s(pid) - before, polls, poller.rate_hz


def poll_costs(
    url: str,
    pid: int,
    job_id: str,
    *,
    rate_hz: float,
    connections: int,
    seconds: float = 4.0,
    rounds: int = 2,
) -> PollCosts:
    """The API's CPU per poll of ``job_id``'s steps, polls back to back on one connection and
    paced at ``rate_hz`` over ``connections``, in alternating order."""
    cpu = {True: 0.0, False: 0.0}
    polls = {True: 0, False: 0}
    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for paced in (True, False) if r % 2 == 0 else (False, True):
            used, answered, rate = _polled(
                url,
                pid,
                job_id,
                rate_hz if paced else BACK_TO_BACK_HZ,
                connections if paced else 1,
                seconds,
            )
            cpu[paced] += used
            polls[paced] += answered
            rates[paced].append(rate)
    return PollCosts(
        back_to_back_ms=cpu[False] / max(1, polls[False]) * 1000,
        back_to_back_hz=sum(rates[False]) / len(rates[False]),
        paced_ms=cpu[True] / max(1, polls[True]) * 1000,
        paced_hz=sum(rates[True]) / len(rates[True]),
    )


def share_slowdown(other_cpu_s: float, job_s: float, cores: int) -> float:
    """How much longer a job that kept all ``cores`` busy would take while other processes
    used ``other_cpu_s`` CPU seconds over its ``job_s`` seconds: their share s of a core leaves
    it cores − s, so it takes cores / (cores − s) as long. A job with serial parts leaves
    cores idle that the others can use for nothing; a job whose threads wait on each other
    loses more than the others take (docs/benchmarks.md)."""
    share = other_cpu_s / job_s
    if share >= cores:
        raise ValueError(f"the others used {share:.2f} cores of {cores}: no job kept them busy")
    return share / (cores - share)
