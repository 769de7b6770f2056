"""Jobs followed by open event streams (``GET /jobs/{id}/events``), against jobs left alone.

The other way to watch a job live: a stream is woken by each write of its job instead of asking
200 times a second. The streams are opened as the job is claimed, by one client process for the
whole run (:mod:`benchmarks.stream_client`), and end with the job's final event.
"""

from __future__ import annotations

import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
from benchmarks.predict import server
from benchmarks.procs import exact_cpu_seconds
from benchmarks.stats import Series, median
from benchmarks.stream_client import Carried

ENDED_WITHIN_S = 120.0  # after the job's end, for its streams to end too


@dataclass
class FollowedJobs:
    """Jobs alternately left alone and followed by ``streams`` event streams."""

    streams: int
    quiet: Series
    followed: Series
    api_cpu_s: float = 0.0  # the API's CPU while its jobs were followed
    client_cpu_s: float = 0.0  # the stream client's
    carried: Carried = field(
        default_factory=Carried
    )  # what the followed jobs' streams carried, all together

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
        return cpu_s / self.followed_streams * 1000

    @property
    def followed_streams(self) -> int:
        """Streams opened over every round."""
        return self.streams * len(self.followed.values)

    def null_streams_env(self) -> dict[str, str]:
        """The schedule of a server that does next to nothing (:mod:`benchmarks.null_server`)
        that writes each stream what these streams carried on average, over a job's time left
        alone: as many chunks, as many bytes."""
        return {
            "MNIST_NULL_STREAM_CHUNKS": str(
                max(1, round(self.carried.chunks / self.followed_streams))
            ),
            "MNIST_NULL_STREAM_BYTES": str(round(self.carried.body_bytes / self.followed_streams)),
            "MNIST_NULL_STREAM_S": f"{self.quiet.median:.6f}",
        }


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

    def ended(self) -> Carried:
        """Wait for the streams opened last to end; what they carried, all together."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], ENDED_WITHIN_S)
        if not ready:
            raise TimeoutError(f"the streams did not end within {ENDED_WITHIN_S:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the stream client exited ({self._proc.wait()})")
        return Carried.parse(line)


@dataclass(frozen=True)
class Followed:
    """One followed job: its claim → finish seconds, the server's and the client's CPU seconds
    meanwhile, and what its streams carried."""

    seconds: float
    api_cpu_s: float
    client_cpu_s: float
    carried: Carried


def followed_job(
    sessions: sessionmaker[Session],
    followers: Followers,
    api_pid: int,
    *,
    streams: int,
    seed: int,
) -> Followed:
    """Submit a job and follow it with ``streams`` event streams from its claim to its end."""
    job_id = claimed_job(sessions, seed=seed)
    api_before, client_before = api_cpu_s(api_pid), followers.cpu_s
    followers.open(job_id, streams)
    seconds = job_seconds(sessions, job_id)
    carried = followers.ended()  # the client checked each stream's end: the final event
    return Followed(
        seconds, api_cpu_s(api_pid) - api_before, followers.cpu_s - client_before, carried
    )


def followed_jobs(
    ws: Workspace,
    sessions: sessionmaker[Session],
    url: str,
    api_pid: int,
    *,
    runs: int,
    streams: int,
    log: str = "worker-streams",
) -> FollowedJobs:
    """Alternate jobs left alone and followed, on one warm worker process (the defaults), its
    log ``log``-STREAMS.log in the workspace."""
    result = FollowedJobs(streams, Series("job, no streams", "s"), Series("job, followed", "s"))
    with worker_process(ws, ws.root / f"{log}-{streams}.log"), Followers(url) as followers:
        job_seconds(sessions, submit(sessions, seed=0))  # warm the worker's data

        def watch(seed: int) -> float:
            job = followed_job(sessions, followers, api_pid, streams=streams, seed=seed)
            result.api_cpu_s += job.api_cpu_s
            result.client_cpu_s += job.client_cpu_s
            result.carried += job.carried
            return job.seconds

        label = f"{streams} streams"
        alternate_rounds(sessions, runs, watch, result.quiet, result.followed, label)
    return result


def crowd_floor(
    ws: Workspace,
    sessions: sessionmaker[Session],
    crowd: FollowedJobs,
    env: dict[str, str],
    log: Path,
    *,
    runs: int,
) -> FollowedJobs:
    """The crowd's streams, as many and from the same client, written what the API's carried
    by a server that does next to nothing (:mod:`benchmarks.null_server`), run with ``env``
    and its schedule: the floor of the crowd's slowdown."""
    null_env = {**env, **crowd.null_streams_env()}
    with server(["-m", "benchmarks.null_server"], null_env, log) as (url, pid):
        return followed_jobs(
            ws, sessions, url, pid, runs=runs, streams=crowd.streams, log="worker-null-streams"
        )
