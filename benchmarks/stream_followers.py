"""Jobs followed by open event streams (``GET /jobs/{id}/events``), against jobs left alone.

The other way to watch a job live: a stream is woken by each write of its job instead of asking
200 times a second. The streams are opened as the job is claimed, by one client process for the
whole run (:mod:`benchmarks.stream_client`), and end with the job's final event.
"""

from __future__ import annotations

import select
import subprocess
import sys
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from benchmarks.env import Workspace, client_command
from benchmarks.jobs import (
    alternate_rounds,
    claimed_job,
    job_seconds,
    submit,
    worker_process,
)
from benchmarks.poll_costs import api_cpu_s
from benchmarks.procs import exact_cpu_seconds
from benchmarks.stats import Series, median

ENDED_WITHIN_S = 120.0  # after the job's end, for its streams to end too


@dataclass
class FollowedJobs:
    """Jobs alternately left alone and followed by ``streams`` event streams."""

    streams: int
    quiet: Series
    followed: Series
    api_cpu_s: float = 0.0  # the API's CPU while its jobs were followed
    client_cpu_s: float = 0.0  # the stream client's

    @property
    def paired(self) -> list[float]:
        """Each round's followed job against its quiet one, less one."""
        return [f / q - 1 for q, f in zip(self.quiet.values, self.followed.values, strict=True)]

    @property
    def slowdown(self) -> float:
        """The median of the rounds' paired slowdowns (as for polled jobs)."""
        return median(self.paired)

    def per_stream_ms(self, cpu_s: float) -> float:
        """CPU per stream per job, over every round."""
        return cpu_s / (self.streams * len(self.followed.values)) * 1000


class Followers:
    """The stream client process (:mod:`benchmarks.stream_client`), for as long as the block
    runs."""

    def __init__(self, base_url: str) -> None:
        self._args = [sys.executable, "-m", "benchmarks.stream_client", base_url]
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Followers:
        self._proc = subprocess.Popen(
            client_command(self._args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()

    @property
    def cpu_s(self) -> float:
        """The client's CPU seconds so far."""
        assert self._proc is not None
        return exact_cpu_seconds(self._proc.pid)

    def open(self, job_id: str, streams: int) -> None:
        """Open ``streams`` streams of the job."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{job_id} {streams}\n")
        self._proc.stdin.flush()

    def ended(self) -> int:
        """Wait for the streams opened last to end; how many events they carried."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], ENDED_WITHIN_S)
        if not ready:
            raise TimeoutError(f"the streams did not end within {ENDED_WITHIN_S:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the stream client exited ({self._proc.wait()})")
        return int(line.split()[1])


def followed_job(
    sessions: sessionmaker[Session],
    followers: Followers,
    api_pid: int,
    *,
    streams: int,
    seed: int,
) -> tuple[float, float, float]:
    """Submit a job and follow it with ``streams`` event streams from its claim to its end:
    its claim → finish seconds, the API's CPU seconds meanwhile and the client's."""
    job_id = claimed_job(sessions, seed=seed)
    api_before, client_before = api_cpu_s(api_pid), followers.cpu_s
    followers.open(job_id, streams)
    seconds = job_seconds(sessions, job_id)
    followers.ended()  # the client checked that each stream ended with the job's final event
    return seconds, api_cpu_s(api_pid) - api_before, followers.cpu_s - client_before


def followed_jobs(
    ws: Workspace,
    sessions: sessionmaker[Session],
    url: str,
    api_pid: int,
    *,
    runs: int,
    streams: int,
) -> FollowedJobs:
    """Alternate jobs left alone and followed, on one warm worker process (the defaults)."""
    result = FollowedJobs(streams, Series("job, no streams", "s"), Series("job, followed", "s"))
    with worker_process(ws, ws.root / f"worker-streams-{streams}.log"), Followers(url) as followers:
        job_seconds(sessions, submit(sessions, seed=0))  # warm the worker's data

        def watch(seed: int) -> float:
            seconds, api_s, client_s = followed_job(
                sessions, followers, api_pid, streams=streams, seed=seed
            )
            result.api_cpu_s += api_s
            result.client_cpu_s += client_s
            return seconds

        label = f"{streams} streams"
        alternate_rounds(sessions, runs, watch, result.quiet, result.followed, label)
    return result
