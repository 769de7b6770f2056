"""Every SQL statement of the service: jobs, the queue, and the metrics series.

Writes a worker makes for a job are fenced on ``(id, attempt, status='running')``: when the
fence matches no row, the worker has lost the job and :class:`LeaseLost` is raised before
anything else of the transaction is written.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from service.clock import CURSOR_PATTERN, new_job_id
from service.errors import InvalidInput, LeaseLost
from service.models import EpochMetric, Job, JobStatus, ModelAlias, TrainStep, WorkerRow
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _encode_cursor(when: datetime, key: str) -> str:
    return f"{(when - _EPOCH) // _MICROSECOND}-{key}"


def _decode_cursor(cursor: str, source: str = "GET /jobs") -> tuple[datetime, str]:
    if re.fullmatch(CURSOR_PATTERN, cursor) is None:
        raise InvalidInput(
            f"cursor is not a value returned as 'next' by {source}",
            details=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        )
    micros, _, job_id = cursor.partition("-")
    return _EPOCH + int(micros) * _MICROSECOND, job_id


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
        return jobs[:limit], _encode_cursor(jobs[limit - 1].created_at, jobs[limit - 1].id)
    return jobs, None


def count_jobs(session: Session, *, status: str) -> int:
    """How many jobs are in ``status``."""
    return session.scalar(select(func.count()).select_from(Job).where(Job.status == status)) or 0


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


def steps_per_epoch(job: Job) -> int:
    """Optimiser steps in one epoch of ``job``."""
    return math.ceil(job.trainset_size / job.batch_size)


def claim_job(
    session: Session, *, worker_id: str, lease_s: float, device: str, now: datetime
) -> Job | None:
    """Atomically take the oldest claimable job for this worker, or None.

    Claimable: queued, or running with an expired lease and attempts left. One UPDATE whose
    subquery picks the row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's IMMEDIATE
    transaction serialises claims), so two workers never take the same attempt.

    A retried job resumes after its last finished epoch (``resume_epoch``, whose training state
    an earlier attempt saved): the metrics past that point are removed in the same transaction,
    so the series stays one consistent run with no duplicated and no missing steps.
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
            error=None,
        )
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    job = session.scalars(stmt).one_or_none()
    if job is None:
        return None
    rewind_to_epoch(session, job, job.resume_epoch)
    session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker_id)
        .values(job_id=job.id, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return job


def rewind_to_epoch(session: Session, job: Job, epoch: int) -> None:
    """Drop the metrics recorded after ``epoch`` and set the job's progress back to it."""
    keep_steps = epoch * steps_per_epoch(job)
    session.execute(
        delete(TrainStep).where(TrainStep.job_id == job.id, TrainStep.step > keep_steps)
    )
    session.execute(
        delete(EpochMetric).where(EpochMetric.job_id == job.id, EpochMetric.epoch > epoch)
    )
    accuracy = None
    if epoch > 0:
        accuracy = session.scalar(
            select(EpochMetric.accuracy).where(
                EpochMetric.job_id == job.id, EpochMetric.epoch == epoch
            )
        )
    values: dict[str, Any] = {"step": keep_steps, "epoch": epoch, "accuracy": accuracy}
    if epoch == 0:
        values.update(resume_epoch=0, resume_checkpoint=None)
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    for key, value in values.items():
        set_committed_value(job, key, value)


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
    resume_checkpoint: str | None = None  # saved with the state after ``epoch``


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
    if progress.resume_checkpoint is not None:
        values["resume_checkpoint"] = progress.resume_checkpoint
        values["resume_epoch"] = progress.epoch
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
        .values(**values, resume_checkpoint=None)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer this worker's")
    _worker_idle(session, worker_id, now)


def release_job(
    session: Session, *, job_id: str, attempt: int, worker_id: str, now: datetime
) -> None:
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
    _worker_idle(session, worker_id, now)


def forget_resume_point(session: Session, *, job_id: str, attempt: int, worker_id: str) -> None:
    """Start a retried job over (its saved training state is gone). Fenced."""
    job = session.scalars(select(Job).where(_fence(job_id, attempt, worker_id))).one_or_none()
    if job is None:
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer this worker's")
    rewind_to_epoch(session, job, 0)


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


# --- workers ---------------------------------------------------------------------------------


def register_worker(
    session: Session, *, worker_id: str, host: str, pid: int, device: str, now: datetime
) -> None:
    """Record a worker process that has started."""
    session.add(
        WorkerRow(id=worker_id, host=host, pid=pid, device=device, started_at=now, heartbeat_at=now)
    )


def _worker_idle(session: Session, worker_id: str, now: datetime) -> None:
    session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker_id)
        .values(job_id=None, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )


def worker_heartbeat(session: Session, *, worker_id: str, now: datetime) -> None:
    """The worker process is alive."""
    session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker_id)
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )


def worker_stopped(session: Session, *, worker_id: str, now: datetime) -> None:
    """The worker process has exited cleanly."""
    session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker_id)
        .values(stopped_at=now, job_id=None)
        .execution_options(synchronize_session=False)
    )


def workers_on_host(session: Session, host: str) -> list[WorkerRow]:
    """Workers on ``host`` that never said they stopped."""
    stmt = select(WorkerRow).where(WorkerRow.host == host, WorkerRow.stopped_at.is_(None))
    return list(session.scalars(stmt))


def recover_dead_worker(session: Session, *, worker_id: str, now: datetime) -> int:
    """Mark a worker known to be dead as stopped and end its jobs' leases now; returns how many.

    Its jobs become claimable at once (as retries) instead of after their leases run out.
    """
    session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker_id)
        .values(stopped_at=now, job_id=None)
        .execution_options(synchronize_session=False)
    )
    result = session.execute(
        update(Job)
        .where(Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def live_workers(session: Session, *, now: datetime, lease_s: float) -> list[WorkerRow]:
    """Workers that have not stopped and were heard from within one lease."""
    stmt = (
        select(WorkerRow)
        .where(
            WorkerRow.stopped_at.is_(None),
            WorkerRow.heartbeat_at >= now - timedelta(seconds=lease_s),
        )
        .order_by(WorkerRow.started_at, WorkerRow.id)
    )
    return list(session.scalars(stmt))


# --- metrics ---------------------------------------------------------------------------------


_JOB_STATUS = select(Job.status).where(Job.id == bindparam("job_id"))
_STEPS_PAGE = (
    select(TrainStep.step, TrainStep.epoch, TrainStep.loss, TrainStep.examples_seen)
    .where(TrainStep.job_id == bindparam("job_id"), TrainStep.step > bindparam("after_step"))
    .order_by(TrainStep.step)
    .limit(bindparam("limit"))
)
_EPOCHS_AFTER = (
    select(EpochMetric.epoch, EpochMetric.accuracy, EpochMetric.examples_seen)
    .where(EpochMetric.job_id == bindparam("job_id"), EpochMetric.epoch > bindparam("after"))
    .order_by(EpochMetric.epoch)
)

# The metrics reads take a Session (the route) or a Connection (the polls' fast lane, which
# skips the ORM altogether).
Reader = Session | Connection


@functools.lru_cache(maxsize=8)  # one per statement and engine (each has its own dialect)
def _compiled(dialect: Dialect, stmt: ClauseElement) -> SQLCompiler:
    compiled = stmt.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    return compiled


def _driver_rows(db: Reader, stmt: ClauseElement, values: dict[str, Any]) -> list[Any]:
    """``stmt``'s rows, fetched with the driver's own cursor in ``db``'s transaction.

    For a 10,000-step page, SQLAlchemy's result rows cost as much again as the driver's fetch
    (docs/benchmarks.md), and these plain columns need none of their processing. The statement
    is compiled once per dialect; its parameters go by position or by name as the driver's
    paramstyle says, defaults (SQLite's OFFSET) filled in.
    """
    connection = db.connection() if isinstance(db, Session) else db
    compiled = _compiled(connection.dialect, stmt)
    params = compiled.construct_params(values)
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())  # type: ignore[assignment]
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(str(compiled), params)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def job_status(db: Reader, job_id: str) -> str | None:
    """A job's status, or None when there is no such job."""
    rows = _driver_rows(db, _JOB_STATUS, {"job_id": job_id})
    return str(rows[0][0]) if rows else None


def read_steps(db: Reader, job_id: str, *, after_step: int, limit: int) -> list[dict[str, Any]]:
    """Steps numbered above ``after_step``, in order, at most ``limit``."""
    rows = _driver_rows(
        db, _STEPS_PAGE, {"job_id": job_id, "after_step": after_step, "limit": limit}
    )
    return [{"step": s, "epoch": e, "loss": x, "examples_seen": n} for s, e, x, n in rows]


def read_epochs(db: Reader, job_id: str) -> list[dict[str, Any]]:
    """Every recorded epoch accuracy of a job, in order (epochs are numbered from 1)."""
    return read_epochs_after(db, job_id, after_epoch=0)


def read_epochs_after(db: Reader, job_id: str, *, after_epoch: int) -> list[dict[str, Any]]:
    """The recorded epoch accuracies of a job numbered above ``after_epoch``, in order."""
    rows = _driver_rows(db, _EPOCHS_AFTER, {"job_id": job_id, "after": after_epoch})
    return [{"epoch": e, "accuracy": a, "examples_seen": n} for e, a, n in rows]


# --- operations: readiness and Prometheus ----------------------------------------------------


def ping(session: Session) -> None:
    """One round trip to the database; raises when it cannot be reached."""
    session.execute(text("SELECT 1"))


def count_jobs_by_status(session: Session) -> dict[str, int]:
    """How many jobs are in each state; every state is present, 0 when none."""
    counts = dict.fromkeys(JobStatus.ALL, 0)
    stmt = select(Job.status, func.count()).group_by(Job.status)
    for status, count in session.execute(stmt):
        counts[status] = int(count)
    return counts


@dataclass(frozen=True)
class RunningSample:
    """Where a running attempt stood at its last write: images trained and when."""

    job_id: str
    attempt: int
    examples_seen: int
    started_at: datetime | None
    heartbeat_at: datetime | None


def running_samples(session: Session) -> list[RunningSample]:
    """Each running job's examples seen at its latest recorded step, with its write times."""
    stmt = (
        select(
            Job.id,
            Job.attempt,
            func.coalesce(TrainStep.examples_seen, 0),
            Job.started_at,
            Job.heartbeat_at,
        )
        .outerjoin(TrainStep, and_(TrainStep.job_id == Job.id, TrainStep.step == Job.step))
        .where(Job.status == JobStatus.RUNNING)
    )
    return [RunningSample(*row) for row in session.execute(stmt)]


# --- models and aliases ----------------------------------------------------------------------

_is_model = and_(Job.status == JobStatus.SUCCEEDED, Job.checkpoint.is_not(None))


def list_models(
    session: Session, *, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """A page of succeeded jobs with weights, most recently finished first, and the next cursor."""
    stmt = (
        select(Job)
        .where(_is_model)
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        finished, job_id = _decode_cursor(cursor, "GET /models")
        stmt = stmt.where(
            or_(Job.finished_at < finished, and_(Job.finished_at == finished, Job.id < job_id))
        )
    jobs = list(session.scalars(stmt))
    if len(jobs) > limit:
        last = jobs[limit - 1]
        assert last.finished_at is not None
        return jobs[:limit], _encode_cursor(last.finished_at, last.id)
    return jobs, None


def get_alias(session: Session, name: str) -> ModelAlias | None:
    """The alias with this name, or None."""
    return session.get(ModelAlias, name)


def list_aliases(session: Session) -> list[ModelAlias]:
    """Every alias, by name."""
    return list(session.scalars(select(ModelAlias).order_by(ModelAlias.name)))


def aliases_of(session: Session, job_ids: Sequence[str]) -> dict[str, list[str]]:
    """The alias names pointing at each of these jobs (jobs without one are left out)."""
    if not job_ids:
        return {}
    stmt = (
        select(ModelAlias.job_id, ModelAlias.name)
        .where(ModelAlias.job_id.in_(job_ids))
        .order_by(ModelAlias.name)
    )
    found: dict[str, list[str]] = {}
    for job_id, name in session.execute(stmt):
        found.setdefault(job_id, []).append(name)
    return found


def set_alias(session: Session, *, name: str, job_id: str, now: datetime) -> ModelAlias:
    """Point ``name`` at ``job_id``: one upsert, so concurrent PUTs of a new name never collide."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(ModelAlias).values(name=name, job_id=job_id, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ModelAlias.name], set_={"job_id": job_id, "updated_at": now}
    )
    session.execute(stmt)
    alias = session.get(ModelAlias, name, populate_existing=True)
    assert alias is not None
    return alias


def delete_alias(session: Session, name: str) -> bool:
    """Remove an alias; False when there was none."""
    result = session.execute(delete(ModelAlias).where(ModelAlias.name == name))
    return bool(result.rowcount)  # type: ignore[attr-defined]
