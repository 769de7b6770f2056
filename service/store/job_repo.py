"""The jobs' own rows: create, read, list, count and cancel (the API's side of a job)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Row, and_, bindparam, delete, func, insert, not_, select, update
from sqlalchemy.orm import Session

from service.clock import new_job_id
from service.schemas import JobCreate
from service.status import TERMINAL, JobStatus
from service.steps import StepPlan
from service.store import engines, wakeups
from service.store.cursors import newest_first
from service.store.engines import Reader
from service.store.sweeps import repo as sweep_repo
from service.store.tables import Job, ModelAlias, TrainStep
from service.store.upkeep import leases


def _queued(
    params: JobCreate, *, max_attempts: int, now: datetime, sweep_id: str | None
) -> dict[str, Any]:
    """A queued job's columns, every one the ORM would not default: one job and a sweep's
    trials inserted in bulk are the same rows."""
    return {
        "id": new_job_id(),
        "status": JobStatus.QUEUED,
        "created_at": now,
        "total_steps": StepPlan.of(params).total_steps,
        "max_attempts": max_attempts,
        "epoch": 0,
        "step": 0,
        "attempt": 0,
        "cancel_requested": False,
        "sweep_id": sweep_id,
        **params.model_dump(),
    }


def create_job(
    session: Session,
    params: JobCreate,
    *,
    max_attempts: int,
    now: datetime,
    sweep_id: str | None = None,
) -> Job:
    """Insert a queued job (a trial of ``sweep_id``, if given)."""
    job = Job(**_queued(params, max_attempts=max_attempts, now=now, sweep_id=sweep_id))
    session.add(job)
    session.flush()
    wakeups.publish(session, wakeups.JOB_QUEUED)
    return job


def create_trials(
    session: Session,
    trials: Sequence[JobCreate],
    *,
    sweep_id: str,
    max_attempts: int,
    now: datetime,
    spacing: timedelta,
) -> None:
    """Insert a sweep's trials, queued, ``spacing`` apart from ``now`` in their order, as
    :func:`create_job` inserts one, in one statement of many rows (a few for the largest
    sweeps): a flush per trial held the write lock 7-10 s for 10,000 trials."""
    rows = [
        _queued(params, max_attempts=max_attempts, now=now + i * spacing, sweep_id=sweep_id)
        for i, params in enumerate(trials)
    ]
    if rows:
        session.execute(insert(Job), rows)
        wakeups.publish(session, wakeups.JOB_QUEUED)


def get_job(session: Session, job_id: str) -> Job | None:
    """The job with this id, or None."""
    return session.get(Job, job_id)


# The PostgreSQL advisory lock that queues jobs one transaction at a time (ASCII "mnistq").
QUEUE_LOCK_KEY = 0x6D6E69737471
_JOB_ROW = select(*Job.__table__.columns).where(Job.__table__.c.id == bindparam("job_id"))


def job_row(db: Reader, job_id: str) -> SimpleNamespace | None:
    """The job with this id as plain columns (attributes by column name), or None.

    What a poll of ``GET /jobs/{id}`` reads in the polls' fast lane
    (:mod:`service.api.lanes.polls`): the ORM's instance and identity map cost several times
    the query itself there, and nothing is written back. Read on the driver's cursor, each
    column processed as SQLAlchemy's results would (:func:`engines.typed_rows`)."""
    rows = engines.typed_rows(db, _JOB_ROW, {"job_id": job_id})
    return SimpleNamespace(**rows[0]) if rows else None


def lock_job(session: Session, job_id: str, *, shared: bool = False) -> Job | None:
    """The job with this id read afresh and locked until the transaction ends, or None.

    On PostgreSQL a row lock (``FOR UPDATE``, or ``FOR SHARE`` when ``shared``): a delete
    and an alias being pointed at the job take it in turn, and whichever comes second reads
    what the first committed. SQLite has no row locks and needs none: its write transactions
    are IMMEDIATE, one at a time (SQLAlchemy leaves the clause out there).
    """
    stmt = select(Job).where(Job.id == job_id).with_for_update(read=shared)
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def delete_job(session: Session, job_id: str) -> None:
    """Delete a job's row; its steps, epochs, aliases and the artifacts stored as rows
    (``MNIST_ARTIFACTS=database``) go with it (``ON DELETE CASCADE``, on SQLite too: its
    connections turn foreign keys on).

    The caller has locked the row (:func:`lock_job`) and checked that it may go.
    """
    session.execute(delete(Job).where(Job.id == job_id))


def lock_trials(session: Session, sweep_id: str) -> list[Row[Any]]:
    """A sweep's trials (``id``, ``sweep_id``, ``status``, ``checkpoint``) in the order they
    were queued, read afresh and locked until the transaction ends, as :func:`lock_job` locks
    one (in that order, on PostgreSQL): for deleting them all."""
    stmt = (
        select(Job.id, Job.sweep_id, Job.status, Job.checkpoint)
        .where(Job.sweep_id == sweep_id)
        .order_by(Job.created_at, Job.id)
        .with_for_update()
    )
    return list(session.execute(stmt))


def delete_trials(session: Session, sweep_id: str) -> None:
    """:func:`delete_job` for every trial of a sweep, in one statement; the caller has locked
    them (:func:`lock_trials`) and checked that they may go."""
    session.execute(delete(Job).where(Job.sweep_id == sweep_id))


def ended_before(session: Session, cutoff: datetime, *, limit: int) -> list[str]:
    """Up to ``limit`` ended jobs of no sweep that finished before ``cutoff`` and that no
    alias names, oldest first: what retention deletes (a sweep's trials go with their sweep,
    :func:`service.store.sweeps.repo.ended_before`)."""
    stmt = (
        select(Job.id)
        .where(
            Job.status.in_(TERMINAL),
            Job.finished_at < cutoff,
            Job.sweep_id.is_(None),
            ~select(ModelAlias.name).where(ModelAlias.job_id == Job.id).exists(),
        )
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def list_jobs(
    session: Session, *, status: JobStatus | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """A page of jobs, newest first, and the cursor of the next page (None on the last)."""
    stmt = select(Job)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return newest_first(
        session, stmt, Job.created_at, limit=limit, cursor=cursor, source="GET /jobs"
    )


def count_jobs(session: Session, *, status: JobStatus) -> int:
    """How many jobs are in ``status``."""
    return session.scalar(select(func.count()).select_from(Job).where(Job.status == status)) or 0


def count_queued_for_adding(session: Session) -> int:
    """How many jobs wait, counted by a transaction that will queue more: on PostgreSQL after a
    transaction-scoped lock that the next such count waits for (two that counted at once, under
    READ COMMITTED, both passed the queue cap; the count after the lock sees what the previous
    holder committed only under READ COMMITTED, the write engine's level); on SQLite the write
    transaction holds the whole database already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(QUEUE_LOCK_KEY)))
    return count_jobs(session, status=JobStatus.QUEUED)


def count_jobs_by_status(session: Session) -> dict[JobStatus, int]:
    """How many jobs are in each state; every state is present, 0 when none."""
    counts = dict.fromkeys(JobStatus, 0)
    stmt = select(Job.status, func.count()).group_by(Job.status)
    for status, count in session.execute(stmt):
        counts[JobStatus(status)] = int(count)
    return counts


def latest_succeeded_job(session: Session) -> Job | None:
    """The most recently finished succeeded job: the default model."""
    stmt = (
        select(Job)
        .where(Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


def _cancel(session: Session, which: Any, *, now: datetime) -> list[str | None]:
    """The cancel rule, for the jobs ``which`` selects: queued ones end ``cancelled`` now,
    running ones are flagged for their worker to stop, and their streams hear of it. Returns
    the sweeps of the jobs that ended, for the caller to settle."""
    ended = session.execute(
        update(Job)
        .where(which, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=now, cancel_requested=True)
        .returning(Job.id, Job.sweep_id)
        .execution_options(synchronize_session=False)
    ).all()
    flagged = session.scalars(
        update(Job)
        .where(which, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    for job_id in [row[0] for row in ended] + list(flagged):
        wakeups.publish(session, wakeups.JOB_PROGRESS, job_id)
    return [row[1] for row in ended]


def request_cancel(session: Session, job: Job, *, now: datetime) -> Job:
    """Cancel a queued job at once, or flag a running one for its worker to stop; one whose
    lease ran out (its worker is gone, and only a worker's claim settled it: with none left
    it stayed running, cancel and all) ends ``cancelled`` now.

    Returns the job as it now is; the caller checks that it was not already finished.
    """
    sweep_repo.settle_all(session, _cancel(session, Job.id == job.id, now=now), now)
    leases.expire_lost_jobs(session, now=now, job_id=job.id)
    session.refresh(job)
    return job


def cancel_trials(session: Session, sweep_id: str, *, now: datetime) -> None:
    """Cancel every queued and running trial of a sweep, by the rule a single job's follows;
    the caller marks the sweep cancelled, then settles it (jobs' rows first, then the sweep's:
    the lock order of :mod:`service.store.sweep_repo`)."""
    _cancel(session, Job.sweep_id == sweep_id, now=now)


@dataclass(frozen=True)
class RunningSample:
    """Where a running attempt stood at its last write: images trained and when."""

    job_id: str
    attempt: int
    examples_seen: int
    started_at: datetime | None
    heartbeat_at: datetime | None
    resume_epoch: int  # 0: no epoch of the job was finished before (or during) this attempt


def running_samples(session: Session) -> list[RunningSample]:
    """Each running job's examples seen at its latest recorded step, with its write times;
    not a job whose lease ran out: no worker trains it (it died or stalled) until one claims
    it again."""
    stmt = (
        select(
            Job.id,
            Job.attempt,
            func.coalesce(TrainStep.examples_seen, 0),
            Job.started_at,
            Job.heartbeat_at,
            Job.resume_epoch,
        )
        .outerjoin(TrainStep, and_(TrainStep.job_id == Job.id, TrainStep.step == Job.step))
        .where(Job.status == JobStatus.RUNNING, not_(leases.lease_expired()))
    )
    return [RunningSample(*row) for row in session.execute(stmt)]
