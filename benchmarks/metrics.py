"""Metrics polling: reading a long series from the API, and polling it while a job trains.

The series is written the way workers write it (``record_progress`` in flush-sized batches),
and read through the service as deployed (``python -m service``), over real HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.env import Workspace, make_workspace
from benchmarks.jobs import recorded, submit
from benchmarks.predict import server
from benchmarks.profiling import Profile, py_spy, read_py_spy, share_rows
from benchmarks.report import Section
from benchmarks.stats import Series, fmt, fmt_ratio, median, percentile, ratio, verdict
from service import repository
from service.clock import utcnow
from service.db import make_engine, make_sessionmaker
from service.models import JobStatus
from service.schemas import JobCreate
from tests.support import process, wait_for

SERIES_STEPS = 50_000
FLUSH_ROWS = 250  # steps per simulated flush
PAGE_LIMIT = 10_000  # the API's largest page
WHOLE_GOAL_MS = 100.0
TAIL_GOAL_MS = 5.0
POLL_RATE_HZ = 200.0
POLLERS = 4  # client threads sharing the rate: one alone waits on each answer
SLOWDOWN_GOAL = 0.10
METRICS_PARTS = {
    "SQL (SQLAlchemy + sqlite3)": "/sqlalchemy/",
    "rows → JSON (service/jobs.py, orjson)": "metrics_json (",
    "validation (pydantic)": "/pydantic/",
    "thread-pool hand-offs (anyio, threading)": "/anyio/",
    "FastAPI / Starlette": "/starlette/",
    "HTTP server (uvicorn)": "/uvicorn/",
}


def write_series(sessions: sessionmaker[Session], steps: int, epochs: int = 3) -> str:
    """A succeeded job with ``steps`` steps and ``epochs`` epochs, written as a worker would."""
    params = JobCreate(trainset_size=60_000, batch_size=64, epochs=epochs)
    with sessions.begin() as session:
        job = repository.create_job(session, params, max_attempts=3, now=utcnow())
        job_id = job.id
    with sessions.begin() as session:
        claimed = repository.claim_job(
            session, worker_id="bench", lease_s=600, device="cpu", now=utcnow()
        )
        if claimed is None or claimed.id != job_id:
            raise RuntimeError(f"expected to claim job {job_id}")
    per_epoch = -(-steps // epochs)
    for first in range(1, steps + 1, FLUSH_ROWS):
        numbers = range(first, min(first + FLUSH_ROWS, steps + 1))
        last, epoch = numbers[-1], (numbers[-1] - 1) // per_epoch + 1
        rows = [
            {"step": s, "epoch": (s - 1) // per_epoch + 1, "loss": 2.3 / s, "examples_seen": s * 64}
            for s in numbers
        ]
        epoch_rows = (
            [{"epoch": epoch, "accuracy": 0.9, "examples_seen": last * 64}]
            if last % per_epoch == 0 or last == steps
            else []
        )
        progress = repository.Progress(
            steps=rows,
            epochs=epoch_rows,
            step=last,
            epoch=epoch,
            accuracy=0.9 if epoch_rows else None,
        )
        with sessions.begin() as session:
            repository.record_progress(
                session,
                job_id=job_id,
                attempt=1,
                worker_id="bench",
                progress=progress,
                lease_s=600,
                now=utcnow(),
            )
    with sessions.begin() as session:
        repository.finish_job(
            session,
            job_id=job_id,
            attempt=1,
            worker_id="bench",
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
        )
    return job_id


def read_whole_series(client: httpx.Client, job_id: str) -> int:
    """Every step of a job, page after page as a client reads it; how many steps."""
    after, total = 0, 0
    while True:
        r = client.get(f"/jobs/{job_id}/metrics", params={"after_step": after, "limit": PAGE_LIMIT})
        r.raise_for_status()
        body = r.json()
        total += len(body["steps"])
        if not body["steps"]:
            return total
        after = body["next_after_step"]


def timed_ms(fn: object) -> float:
    """Milliseconds one call of ``fn`` takes."""
    assert callable(fn)
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


class Poller(threading.Thread):
    """Polls a job's new steps at a fixed rate, as a live loss chart would."""

    def __init__(self, base_url: str, job_id: str, rate_hz: float) -> None:
        super().__init__(daemon=True, name="poller")
        self._url = base_url
        self._job_id = job_id
        self._period_s = 1 / rate_hz
        self._done = threading.Event()
        self.polls = 0
        self.latencies_ms: list[float] = []

    def run(self) -> None:
        """Poll until stopped; each poll asks only for steps after the last one seen."""
        after = 0
        next_at = time.perf_counter()
        with httpx.Client(base_url=self._url, timeout=10) as client:
            while not self._done.is_set():
                started = time.perf_counter()
                r = client.get(f"/jobs/{self._job_id}/metrics", params={"after_step": after})
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
                after = r.json()["next_after_step"]
                self.polls += 1
                next_at += self._period_s
                delay = next_at - time.perf_counter()
                if delay > 0:
                    self._done.wait(delay)
                else:
                    next_at = time.perf_counter()  # fell behind: don't burst to catch up

    def stop(self) -> float:
        """Stop; the achieved polls per second are computed by the caller."""
        self._done.set()
        self.join()
        return float(self.polls)


@contextlib.contextmanager
def worker_process(ws: Workspace, log: Path) -> Iterator[None]:
    """``python -m workers`` on the workspace, for as long as the block runs."""
    with process(["-m", "workers"], ws.env(poll_interval_s="0.05"), log):
        yield


def job_seconds(sessions: sessionmaker[Session], job_id: str) -> float:
    """Wait for a job to succeed; its claim → finish time from the database."""

    def done() -> bool:
        job, _, _ = recorded(sessions, job_id)
        if job.status in JobStatus.TERMINAL and job.status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job_id} ended {job.status}: {job.error}")
        return job.status == JobStatus.SUCCEEDED

    wait_for(done, timeout_s=600, what=f"job {job_id}", every_s=0.1)
    job, _, _ = recorded(sessions, job_id)
    if job.started_at is None or job.finished_at is None:
        raise RuntimeError(f"job {job_id} has no start or finish time")
    return (job.finished_at - job.started_at).total_seconds()


def started_running(sessions: sessionmaker[Session], job_id: str) -> bool:
    """Whether a worker has claimed the job."""
    return recorded(sessions, job_id)[0].status != JobStatus.QUEUED


@dataclass
class MetricsResult:
    """The goal figures."""

    whole_ms: float
    tail_ms: float
    slowdown: float


def run_metrics(section: Section, root: Path, *, runs: int, profile: bool) -> MetricsResult:
    """Measure and write the metrics section."""
    ws = make_workspace(root)
    engine = make_engine(ws.database_url)
    sessions = make_sessionmaker(engine)
    try:
        started = time.perf_counter()
        job_id = write_series(sessions, SERIES_STEPS)
        write_s = time.perf_counter() - started
        with server(["-m", "service"], ws.env(), root / "api.log") as (url, pid):
            client = httpx.Client(base_url=url, timeout=30)
            assert read_whole_series(client, job_id) == SERIES_STEPS
            whole = Series("whole series", "ms")
            page = Series("one 10,000-step page", "ms")
            tail = Series("after_step poll near the end", "ms")
            for _ in range(max(runs, 5) * 2):
                whole.add(timed_ms(lambda: read_whole_series(client, job_id)))
                page.add(
                    timed_ms(
                        lambda: client.get(
                            f"/jobs/{job_id}/metrics",
                            params={"after_step": 20_000, "limit": PAGE_LIMIT},
                        ).raise_for_status()
                    )
                )
            tail_values = [
                timed_ms(
                    lambda: client.get(
                        f"/jobs/{job_id}/metrics", params={"after_step": SERIES_STEPS - 10}
                    ).raise_for_status()
                )
                for _ in range(300)
            ]
            for v in tail_values:
                tail.add(v)
            prof: Profile | None = None
            if profile:
                out = root / "metrics-profile.txt"
                spy = py_spy(pid, 5, out, subprocesses=True)
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    read_whole_series(client, job_id)
                prof = read_py_spy(spy, out)

            # Polling while a job trains: alternate jobs with and without 200 polls/s.
            quiet, polled = Series("job, no polls", "s"), Series("job, 200 polls/s", "s")
            achieved: list[float] = []
            poll_p50: list[float] = []
            with worker_process(ws, root / "worker.log"):
                job_seconds(sessions, submit(sessions, seed=0))  # warm the worker's data
                for r in range(runs):
                    quiet.add(job_seconds(sessions, submit(sessions, seed=r)))
                    polled_id = submit(sessions, seed=r)
                    wait_for(
                        functools.partial(started_running, sessions, polled_id),
                        timeout_s=60,
                        what="the job to start",
                        every_s=0.005,
                    )
                    pollers = [
                        Poller(url, polled_id, POLL_RATE_HZ / POLLERS) for _ in range(POLLERS)
                    ]
                    t0 = time.perf_counter()
                    for p in pollers:
                        p.start()
                    seconds = job_seconds(sessions, polled_id)
                    polls = sum(p.stop() for p in pollers)
                    polled.add(seconds)
                    achieved.append(polls / (time.perf_counter() - t0))
                    poll_p50.append(median([ms for p in pollers for ms in p.latencies_ms]))
                    print(
                        f"  metrics round {r + 1}/{runs}: job {quiet.values[-1]:.2f} s, "
                        f"with polls {seconds:.2f} s ({achieved[-1]:.0f} polls/s)",
                        file=sys.stderr,
                        flush=True,
                    )
            client.close()
    finally:
        engine.dispose()

    slowdown = ratio(polled.median, quiet.median) - 1
    tail_p50 = percentile(tail.values, 50)
    section.para(
        f"A succeeded job with {SERIES_STEPS:,} steps, written by `record_progress` in "
        f"batches of {FLUSH_ROWS} ({write_s:.1f} s), read from `python -m service` over HTTP "
        f"with one client. The whole series is every page of `GET /jobs/{{id}}/metrics` at the "
        f"largest page ({PAGE_LIMIT:,} steps) followed to the end, as a client reads it."
    )
    section.table(
        ["figure", "p50", "p90", "runs"],
        [
            [
                s.name,
                fmt(percentile(s.values, 50), "ms"),
                fmt(percentile(s.values, 90), "ms"),
                len(s.values),
            ]
            for s in (whole, page, tail)
        ],
    )
    section.para(
        f"Polling during training: a worker process (`python -m workers`, data warm) runs "
        f"10,000-image × 3-epoch jobs, alternately left alone and polled by a client at "
        f"{POLL_RATE_HZ:.0f} requests/s in all ({POLLERS} client threads, each asking for the "
        f"steps after the last one it saw); job time is "
        f"claim → finish from the database, median of {runs}."
    )
    section.table(
        ["figure", "median", "min–max"],
        [
            [quiet.name, fmt(quiet.median, "s"), f"{fmt(quiet.spread[0])}–{fmt(quiet.spread[1])}"],
            [
                polled.name,
                fmt(polled.median, "s"),
                f"{fmt(polled.spread[0])}–{fmt(polled.spread[1])}",
            ],
            ["polls/s achieved", fmt(median(achieved)), ""],
            ["a poll's latency during training, p50", fmt(median(poll_p50), "ms"), ""],
        ],
    )
    section.goal_table(
        [
            [
                f"whole series p50 ≤ {WHOLE_GOAL_MS:.0f} ms",
                fmt(whole.median, "ms"),
                verdict(whole.median <= WHOLE_GOAL_MS),
            ],
            [
                f"after_step poll near the end p50 ≤ {TAIL_GOAL_MS:.0f} ms",
                fmt(tail_p50, "ms"),
                verdict(tail_p50 <= TAIL_GOAL_MS),
            ],
            [
                f"{POLL_RATE_HZ:.0f} polls/s slow a job by ≤ {SLOWDOWN_GOAL:.0%}",
                f"{slowdown:+.1%} ({fmt_ratio(ratio(polled.median, quiet.median))})",
                verdict(slowdown <= SLOWDOWN_GOAL),
            ],
        ],
    )
    if prof is not None:
        section.para(f"Profile of the API reading whole series (py-spy, {prof.samples} samples):")
        section.table(
            ["where the server's time goes", "share"],
            share_rows(prof.inclusive_shares(METRICS_PARTS).items()),
        )
        section.table(["hottest functions (self time)", "share"], share_rows(prof.self_shares(6)))
    return MetricsResult(whole.median, tail_p50, slowdown)
