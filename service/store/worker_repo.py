"""The worker processes' rows: registration, liveness, the job each runs, dead-worker recovery."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.status import JobStatus
from service.store import wakeups
from service.store.tables import Job, WorkerRow
from service.store.upkeep.db_clock import database_time


def register_worker(
    session: Session,
    *,
    worker_id: str,
    host: str,
    pid: int,
    device: str,
    now: datetime,
    pid_space: str | None = None,
) -> None:
    """Record a worker process that has started (again, if a retried write did already),
    heard from now."""
    row = WorkerRow(id=worker_id, host=host, pid=pid, device=device, pid_space=pid_space)
    row.started_at = row.heartbeat_at = now
    session.merge(row)
    session.flush()
    worker_heartbeat(session, worker_id=worker_id)


def worker_heartbeat(session: Session, *, worker_id: str) -> None:
    """The worker process is alive, now by the database's clock (:mod:`.upkeep.db_clock`), on which
    :func:`live_workers` judges it."""
    session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker_id)
        .values(heartbeat_at=database_time())
        .execution_options(synchronize_session=False)
    )


def worker_stopped(session: Session, *, worker_id: str, now: datetime) -> None:
    """The worker process has exited cleanly."""
    session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker_id)
        .values(stopped_at=now)
        .execution_options(synchronize_session=False)
    )


def workers_in_pid_space(session: Session, pid_space: str) -> list[WorkerRow]:
    """Workers whose pids are processes of ``pid_space`` (``workers.host.pid_space``) that
    never said they stopped: those whose pids a process there can look up."""
    stmt = select(WorkerRow).where(WorkerRow.pid_space == pid_space, WorkerRow.stopped_at.is_(None))
    return list(session.scalars(stmt))


def recover_dead_worker(session: Session, *, worker_id: str, now: datetime) -> int:
    """Mark a worker known to be dead as stopped and end its jobs' leases now; returns how many.

    Its jobs become claimable at once (as retries) instead of after their leases run out.
    """
    worker_stopped(session, worker_id=worker_id, now=now)
    result = session.execute(
        update(Job)
        .where(Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=database_time())
        .execution_options(synchronize_session=False)
    )
    jobs = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if jobs:
        wakeups.publish(session, wakeups.JOB_QUEUED)
    return jobs


def live_workers(session: Session, *, lease_s: float) -> list[tuple[WorkerRow, list[str]]]:
    """Workers that have not stopped and were heard from within one lease (on the database's
    clock), each with the jobs it holds, in the order it claimed them (a pack's several).

    A worker holds a job while the job runs under its name: a worker fenced off (its lease
    taken by another, or the job ended without it) holds none of it, whatever its own row
    last recorded. Decided here, once, for every way a lease can be lost.
    """
    stmt = (
        select(WorkerRow)
        .where(
            WorkerRow.stopped_at.is_(None),
            WorkerRow.heartbeat_at >= database_time(-lease_s),
        )
        .order_by(WorkerRow.started_at, WorkerRow.id)
    )
    rows = list(session.scalars(stmt))
    held: dict[str, list[str]] = {row.id: [] for row in rows}
    if held:
        jobs = (
            select(Job.worker_id, Job.id)
            .where(Job.status == JobStatus.RUNNING, Job.worker_id.in_(held))
            .order_by(Job.started_at, Job.id)
        )
        for worker_id, job_id in session.execute(jobs):
            held[str(worker_id)].append(job_id)
    return [(row, held[row.id]) for row in rows]
