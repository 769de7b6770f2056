"""Running the service's own worker on one job, timed from claim to its terminal status."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.schemas import JobCreate
from service.settings import Settings
from service.store import job_repo, queue_repo
from service.store.tables import EpochMetric, Job, TrainStep
from workers.endings import Outcome
from workers.worker import Worker


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
