"""Jobs polled 200 times a second (``GET /jobs/{id}/metrics``, as a live chart polls), against
jobs left alone, on one warm worker process.

The pollers are wrk processes (:class:`benchmarks.series_clients.Poller`); the server they poll
is the API, or for the floor the server that does nothing (:mod:`benchmarks.null_server`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from benchmarks.env import Workspace
from benchmarks.jobs import alternate_rounds, claimed_job, job_seconds, submit, worker_process
from benchmarks.poll_costs import api_cpu_s, share_slowdown
from benchmarks.series_clients import Poller
from benchmarks.stats import Series, median
from workers.tuning.threads import usable_cores

POLL_RATE_HZ = 200.0
POLLERS = 4  # client connections sharing the rate


@dataclass
class PolledJobs:
    """Jobs of one worker configuration, alternately left alone and polled."""

    label: str
    quiet: Series
    polled: Series
    achieved: list[float]
    poll_p50: list[float]
    polls: int = 0
    api_cpu_s: float = 0.0  # the API's CPU while its jobs were polled
    client_cpu_s: float = 0.0  # the poller's (wrk's)

    def cpu_per_poll_ms(self, cpu_s: float) -> float:
        """CPU per poll over every round."""
        return cpu_s / max(1, self.polls) * 1000

    @property
    def share_slowdown(self) -> float:
        """The slowdown the polls' CPU (the API's and the pollers') alone would cause a job that
        kept every core busy (:func:`benchmarks.poll_costs.share_slowdown`)."""
        other_s = self.api_cpu_s + self.client_cpu_s
        return share_slowdown(other_s, sum(self.polled.values), usable_cores())

    @property
    def paired(self) -> list[float]:
        """Each round's polled job against its quiet one, less one."""
        return [p / q - 1 for q, p in zip(self.quiet.values, self.polled.values, strict=True)]

    @property
    def slowdown(self) -> float:
        """How much longer a polled job took than the quiet job of its round (the median).

        Paired by round, so that a drift of the machine's speed over the run (this host's
        swings by 2× between sessions, and by a tenth within minutes) moves both jobs of a pair.
        """
        return median(self.paired)


def polled_jobs(
    ws: Workspace,
    sessions: sessionmaker[Session],
    url: str,
    api_pid: int,
    *,
    runs: int,
    label: str,
    log: Path,
    **worker_settings: str,
) -> PolledJobs:
    """Alternate jobs with and without 200 polls/s on one warm worker process."""
    result = PolledJobs(
        label, Series("job, no polls", "s"), Series("job, 200 polls/s", "s"), [], []
    )
    with worker_process(ws, log, **worker_settings):
        job_seconds(sessions, submit(sessions, seed=0))  # warm the worker's data

        def watch(seed: int) -> float:
            polled = polled_job(sessions, url, api_pid, seed=seed)
            result.achieved.append(polled.rate_hz)
            result.poll_p50.append(polled.p50_ms)
            result.polls += polled.polls
            result.api_cpu_s += polled.api_cpu_s
            result.client_cpu_s += polled.client_cpu_s
            return polled.seconds

        alternate_rounds(sessions, runs, watch, result.quiet, result.polled, label)
    return result


@dataclass
class PolledJob:
    """One job polled from its claim to its end."""

    seconds: float  # claim → finish, from the database
    polls: int
    rate_hz: float  # polls a second, as the pollers counted them
    p50_ms: float
    api_cpu_s: float  # the API's CPU meanwhile
    client_cpu_s: float  # the pollers'


def polled_job(sessions: sessionmaker[Session], url: str, api_pid: int, *, seed: int) -> PolledJob:
    """Submit a job and poll it from its claim until it has succeeded."""
    job_id = claimed_job(sessions, seed=seed)
    with Poller(url, job_id, POLL_RATE_HZ, POLLERS) as poller:
        api_before = api_cpu_s(api_pid)
        seconds = job_seconds(sessions, job_id)
        polls = poller.stop()
        api_used = api_cpu_s(api_pid) - api_before
    return PolledJob(seconds, polls, poller.rate_hz, poller.p50_ms, api_used, poller.cpu_s)
