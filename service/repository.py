"""Every SQL statement of the service: jobs, the queue, and the metrics series.

Writes a worker makes for a job are fenced on ``(id, attempt, status='running')``: when the
fence matches no row, the worker has lost the job and :class:`LeaseLost` is raised before
anything else of the transaction is written.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from service.clock import new_job_id
from service.errors import InvalidInput, LeaseLost
from service.models import EpochMetric, Job, JobStatus, TrainStep
from service.schemas import JobCreate


def total_steps_for(params: JobCreate) -> int:
    """Optimiser steps a job will take: ceil(trainset / batch) per epoch."""
    return math.ceil(params.trainset_size / params.batch_size) * params.epochs


def create_job(session: Session, params: JobCreate, *, max_attempts: int, now: datetime) -> Job:
    """Insert a queued job."""
    job = Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        created_at=now,
        total_steps=total_steps_for(params),
        max_attempts=max_attempts,
        epoch=0,
        step=0,
        attempt=0,
        cancel_requested=False,
        **params.model_dump(),
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    """The job with this id, or None."""
    return session.get(Job, job_id)


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        return datetime.fromisoformat(created), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "cursor is not a value returned as 'next' by GET /jobs",
            details=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        ) from exc


def list_jobs(
    session: Session, *, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """A page of jobs, newest first, and the cursor of the next page (None on the last)."""
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if cursor is not None:
        created, job_id = _decode_cursor(cursor)
        stmt = stmt.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    jobs = list(session.scalars(stmt))
    if len(jobs) > limit:
        return jobs[:limit], _encode_cursor(jobs[limit - 1])
    return jobs, None


def latest_succeeded_job(session: Session) -> Job | None:
    """The most recently finished succeeded job: the default model."""
    stmt = (
        select(Job)
        .where(Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


# --- the queue -------------------------------------------------------------------------------


def _lease_expired(now: datetime) -> Any:
    return and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)


def expire_lost_jobs(session: Session, *, now: datetime) -> int:
    """End jobs whose worker vanished and that may not run again; returns how many.

    A cancelled-while-running job whose worker died ends ``cancelled``; one that has used up
    its attempts ends ``failed``. The others are left for :func:`claim_job` to retry.
    """
    cancelled = session.execute(
        update(Job)
        .where(_lease_expired(now), Job.cancel_requested.is_(True))
        .values(status=JobStatus.CANCELLED, finished_at=now, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    failed = session.execute(
        update(Job)
        .where(_lease_expired(now), Job.attempt >= Job.max_attempts)
        .values(
            status=JobStatus.FAILED,
            finished_at=now,
            lease_expires_at=None,
            error="worker lost " + Job.attempt.cast(Job.error.type) + " times",
        )
        .execution_options(synchronize_session=False)
    )
    return int(cancelled.rowcount or 0) + int(failed.rowcount or 0)  # type: ignore[attr-defined]


def claim_job(
    session: Session, *, worker_id: str, lease_s: float, device: str, now: datetime
) -> Job | None:
    """Atomically take the oldest claimable job for this worker, or None.

    Claimable: queued, or running with an expired lease and attempts left. One UPDATE whose
    subquery picks the row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's IMMEDIATE
    transaction serialises claims), so two workers never take the same attempt. A retried job
    starts over: an earlier attempt's metrics are removed in the same transaction.
    """
    expire_lost_jobs(session, now=now)
    claimable = and_(
        or_(Job.status == JobStatus.QUEUED, _lease_expired(now)),
        Job.attempt < Job.max_attempts,
        Job.cancel_requested.is_(False),
    )
    pick = (
        select(Job.id)
        .where(claimable)
        .order_by(Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(Job)
        .where(Job.id == pick, claimable)
        .values(
            status=JobStatus.RUNNING,
            attempt=Job.attempt + 1,
            worker_id=worker_id,
            device=device,
            started_at=now,
            heartbeat_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
            epoch=0,
            step=0,
            accuracy=None,
            error=None,
        )
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    job = session.scalars(stmt).one_or_none()
    if job is not None:
        session.execute(delete(TrainStep).where(TrainStep.job_id == job.id))
        session.execute(delete(EpochMetric).where(EpochMetric.job_id == job.id))
    return job


def _fence(job_id: str, attempt: int, worker_id: str) -> Any:
    return and_(
        Job.id == job_id,
        Job.attempt == attempt,
        Job.worker_id == worker_id,
        Job.status == JobStatus.RUNNING,
    )


@dataclass(frozen=True)
class Progress:
    """What a worker reports in one flush."""

    steps: Sequence[dict[str, Any]]  # rows for train_steps: step, epoch, loss, examples_seen
    epochs: Sequence[dict[str, Any]]  # rows for epoch_metrics: epoch, accuracy, examples_seen
    step: int
    epoch: int
    accuracy: float | None


def record_progress(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    worker_id: str,
    progress: Progress,
    lease_s: float,
    now: datetime,
) -> bool:
    """Write buffered metrics, advance progress and renew the lease; True if cancel was asked.

    Raises :class:`LeaseLost` (writing nothing) when this attempt no longer owns the job.
    """
    values: dict[str, Any] = {
        "step": progress.step,
        "epoch": progress.epoch,
        "heartbeat_at": now,
        "lease_expires_at": now + timedelta(seconds=lease_s),
    }
    if progress.accuracy is not None:
        values["accuracy"] = progress.accuracy
    row = session.execute(
        update(Job)
        .where(_fence(job_id, attempt, worker_id))
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer this worker's")
    if progress.steps:
        # On the Connection: a plain executemany, without the ORM's bulk-insert bookkeeping,
        # which took more time than the SQL itself (docs/benchmarks.md).
        session.connection().execute(
            insert(TrainStep), [{"job_id": job_id, **r} for r in progress.steps]
        )
    if progress.epochs:
        session.execute(insert(EpochMetric), [{"job_id": job_id, **r} for r in progress.epochs])
    return bool(row[0])


def heartbeat(
    session: Session, *, job_id: str, attempt: int, worker_id: str, lease_s: float, now: datetime
) -> bool:
    """Renew the lease without other progress; True if cancel was asked. Fenced."""
    row = session.execute(
        update(Job)
        .where(_fence(job_id, attempt, worker_id))
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer this worker's")
    return bool(row[0])


def finish_job(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    worker_id: str,
    status: str,
    now: datetime,
    error: str | None = None,
    checkpoint: str | None = None,
) -> None:
    """Move a running job to a terminal state. Fenced: raises :class:`LeaseLost`."""
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "lease_expires_at": None,
        "error": error,
    }
    if checkpoint is not None:
        values["checkpoint"] = checkpoint
    result = session.execute(
        update(Job)
        .where(_fence(job_id, attempt, worker_id))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer this worker's")


def release_job(session: Session, *, job_id: str, attempt: int, worker_id: str) -> None:
    """Give a running job back to the queue (a worker shutting down). Fenced.

    The attempt is not counted against ``max_attempts``: the worker left on purpose.
    """
    result = session.execute(
        update(Job)
        .where(_fence(job_id, attempt, worker_id))
        .values(
            status=JobStatus.QUEUED,
            attempt=Job.attempt - 1,
            worker_id=None,
            lease_expires_at=None,
            heartbeat_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer this worker's")


def request_cancel(session: Session, job: Job, *, now: datetime) -> Job:
    """Cancel a queued job at once, or flag a running one for its worker to stop.

    Returns the job as it now is; the caller checks that it was not already finished.
    """
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=now, cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    return job


# --- metrics ---------------------------------------------------------------------------------


def read_steps(
    session: Session, job_id: str, *, after_step: int, limit: int
) -> list[dict[str, Any]]:
    """Steps numbered above ``after_step``, in order, at most ``limit``."""
    stmt = (
        select(TrainStep.step, TrainStep.epoch, TrainStep.loss, TrainStep.examples_seen)
        .where(TrainStep.job_id == job_id, TrainStep.step > after_step)
        .order_by(TrainStep.step)
        .limit(limit)
    )
    # Core rows fetched at once, then plain dicts: on a 10,000-step page the ORM result,
    # row-by-row fetching and Row._asdict() cost several times the query (docs/benchmarks.md).
    rows = session.connection().execute(stmt).all()
    return [{"step": s, "epoch": e, "loss": x, "examples_seen": n} for s, e, x, n in rows]


def read_epochs(session: Session, job_id: str) -> list[dict[str, Any]]:
    """Every recorded epoch accuracy of a job, in order."""
    stmt = (
        select(EpochMetric.epoch, EpochMetric.accuracy, EpochMetric.examples_seen)
        .where(EpochMetric.job_id == job_id)
        .order_by(EpochMetric.epoch)
    )
    return [row._asdict() for row in session.execute(stmt)]
