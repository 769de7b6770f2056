"""Running the service's own worker on one job, timed from claim to its terminal status; and a
long series written as workers write it, for the readers' benchmarks."""

from __future__ import annotations

import contextlib
import functools
import io
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.env import Workspace
from benchmarks.stats import Series
from service.clock import utcnow
from service.schemas import JobCreate
from service.settings import Settings
from service.status import TERMINAL, JobStatus
from service.store import job_repo, queue_repo
from service.store.tables import EpochMetric, Job, TrainStep
from tests.support import process, wait_for
from workers.endings import Outcome
from workers.worker import Worker

FLUSH_ROWS = 250  # steps per simulated flush (write_series)


@dataclass(frozen=True)
class JobRun:
    """A job as the worker ran it and as the database recorded it."""

    job_id: str
    status: str
    seconds: float  # claim → terminal status, as the worker's caller sees it
    flush_seconds: float  # time inside the reporter's flushes (the metric writes)
    accuracy: float | None
    steps_recorded: int
    epochs_recorded: int
    total_steps: int


def submit(sessions: sessionmaker[Session], **params: Any) -> str:
    """Queue a job with these parameters; returns its id."""
    with sessions.begin() as session:
        job = job_repo.create_job(
            session, JobCreate.model_validate(params), max_attempts=3, now=utcnow()
        )
        return job.id


def recorded(sessions: sessionmaker[Session], job_id: str) -> tuple[Job, int, int]:
    """The job row, and how many step and epoch rows it has."""
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        steps = session.scalar(select(func.count()).where(TrainStep.job_id == job_id)) or 0
        epochs = session.scalar(select(func.count()).where(EpochMetric.job_id == job_id)) or 0
        return job, steps, epochs


def _no_record_progress(_session: Session, **_kwargs: Any) -> bool:
    return False


@contextlib.contextmanager
def without_persistence() -> Iterator[None]:
    """The worker's reporter does everything but its database transaction.

    Its sessions begin lazily, so with ``record_progress`` stubbed a flush touches no database:
    the difference to a normal job is the cost of the metric writes.
    """
    with mock.patch.object(queue_repo, "record_progress", _no_record_progress):
        yield


def claim_and_run(worker: Worker, job_id: str) -> tuple[Outcome, float]:
    """Claim ``job_id`` and run it; its outcome and the seconds from claim to terminal status.

    The tqdm bar goes to a buffer rather than the terminal.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        started = time.perf_counter()
        job = worker.claim()
        if job is None or job.id != job_id:
            raise RuntimeError(f"expected to claim job {job_id}: another job was queued")
        outcome = worker.run_job(job)
        return outcome, time.perf_counter() - started


def run_one_job(
    settings: Settings, sessions: sessionmaker[Session], *, persist: bool = True, **params: Any
) -> JobRun:
    """Queue a job, then claim and run it with a fresh :class:`Worker` as ``python -m workers``.

    The worker is built as the service builds it (so its thread setting applies).
    """
    job_id = submit(sessions, **params)
    worker = Worker(settings, sessions, show_progress=True)
    persistence = contextlib.nullcontext() if persist else without_persistence()
    with persistence:
        outcome, seconds = claim_and_run(worker, job_id)
    row, steps, epochs = recorded(sessions, job_id)
    return JobRun(
        job_id=job_id,
        status=outcome.status,
        seconds=seconds,
        flush_seconds=outcome.flush_seconds,
        accuracy=row.accuracy,
        steps_recorded=steps,
        epochs_recorded=epochs,
        total_steps=row.total_steps,
    )


@contextlib.contextmanager
def worker_process(ws: Workspace, log: Path, **settings: str) -> Iterator[None]:
    """``python -m workers`` on the workspace (with these MNIST_* settings), for as long as
    the block runs."""
    with process(["-m", "workers"], ws.env(poll_interval_s="0.05", **settings), log):
        yield


def job_seconds(sessions: sessionmaker[Session], job_id: str) -> float:
    """Wait for a job to succeed; its claim → finish time from the database."""

    def done() -> bool:
        job, _, _ = recorded(sessions, job_id)
        if job.status in TERMINAL and job.status != JobStatus.SUCCEEDED:
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


def alternate_rounds(
    sessions: sessionmaker[Session],
    runs: int,
    watch: Callable[[int], float],
    quiet: Series,
    watched: Series,
    label: str,
) -> None:
    """``runs`` rounds of a job left alone and a job watched (``watch(seed)`` submits one,
    watches it to its end and gives its seconds), on the worker already running. Every other
    round the watched job goes first: neither kind always follows the other."""
    for r in range(runs):
        quiet_first = r % 2 == 0
        if quiet_first:
            quiet.add(job_seconds(sessions, submit(sessions, seed=r)))
        watched.add(watch(r))
        if not quiet_first:
            quiet.add(job_seconds(sessions, submit(sessions, seed=r)))
        print(
            f"  metrics round {r + 1}/{runs} ({label}): job {quiet.values[-1]:.2f} s, "
            f"watched {watched.values[-1]:.2f} s",
            file=sys.stderr,
            flush=True,
        )


def claimed_job(sessions: sessionmaker[Session], *, seed: int) -> str:
    """Submit a job and wait until a worker has claimed it; its id."""
    job_id = submit(sessions, seed=seed)
    wait_for(
        functools.partial(started_running, sessions, job_id),
        timeout_s=60,
        what="the job to start",
        every_s=0.005,
    )
    return job_id


def write_series(sessions: sessionmaker[Session], steps: int, epochs: int = 3) -> str:
    """A succeeded job with ``steps`` steps and ``epochs`` epochs, written as a worker would."""
    params = JobCreate(trainset_size=60_000, batch_size=64, epochs=epochs)
    with sessions.begin() as session:
        job = job_repo.create_job(session, params, max_attempts=3, now=utcnow())
        job_id = job.id
    with sessions.begin() as session:
        claimed = queue_repo.claim_job(
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
        progress = queue_repo.Progress(
            steps=rows,
            epochs=epoch_rows,
            step=last,
            epoch=epoch,
            accuracy=0.9 if epoch_rows else None,
        )
        with sessions.begin() as session:
            queue_repo.record_progress(
                session,
                job_id=job_id,
                attempt=1,
                worker_id="bench",
                progress=progress,
                lease_s=600,
                now=utcnow(),
            )
    with sessions.begin() as session:
        queue_repo.finish_job(
            session,
            job_id=job_id,
            attempt=1,
            worker_id="bench",
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
        )
    return job_id
