"""The worker processes' rows: registration, liveness, the job each runs, dead-worker recovery."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.status import JobStatus
from service.store import wakeups
from service.store.tables import Job, WorkerRow


def register_worker(
    session: Session, *, worker_id: str, host: str, pid: int, device: str, now: datetime
) -> None:
    """Record a worker process that has started (again, if a retried write did already)."""
    session.merge(
        WorkerRow(id=worker_id, host=host, pid=pid, device=device, started_at=now, heartbeat_at=now)
    )


def worker_idle(session: Session, worker_id: str, now: datetime) -> None:
    """The worker runs no job now (it finished or released one)."""
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
    worker_stopped(session, worker_id=worker_id, now=now)
    result = session.execute(
        update(Job)
        .where(Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=now)
        .execution_options(synchronize_session=False)
    )
    jobs = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if jobs:
        wakeups.publish(session, wakeups.JOB_QUEUED)
    return jobs


def live_workers(session: Session, *, now: datetime, lease_s: float) -> list[WorkerRow]:
    """Workers that have not stopped and were heard from within one lease.

    A worker's ``job_id`` is its job only while it still holds that job's lease: a worker
    fenced off (its lease taken by another, or the job ended without it) shows none, whatever
    its row last recorded. Decided here, once, for every way a lease can be lost.
    """
    holds = and_(
        Job.id == WorkerRow.job_id,
        Job.worker_id == WorkerRow.id,
        Job.status == JobStatus.RUNNING,
    )
    stmt = (
        select(WorkerRow, Job.id)
        .outerjoin(Job, holds)
        .where(
            WorkerRow.stopped_at.is_(None),
            WorkerRow.heartbeat_at >= now - timedelta(seconds=lease_s),
        )
        .order_by(WorkerRow.started_at, WorkerRow.id)
    )
    rows = []
    for row, held in session.execute(stmt):
        if row.job_id != held:
            set_committed_value(row, "job_id", held)
        rows.append(row)
    return rows
