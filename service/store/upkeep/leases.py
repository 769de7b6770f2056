"""Leases: which jobs a claim may take and the lease it writes, and leases that ran out (the
jobs of workers that vanished), settled in one statement.

A lease is written and judged on one clock, the database's (:mod:`.db_clock`), at the moment
the statement runs: a claim that waited for a lock or a slow round trip is not handed a lease
already spent, and workers whose clocks disagree (on several hosts) never take a healthy job
from one another. Other times (``started_at``, ``heartbeat_at``, ``finished_at``) stay the
writer's own, as its rate and its job's duration are read from them.

The settling is run by the claims (:func:`service.store.queue_repo.claim_job`), on whichever
host claims, each worker at most once per poll interval; what it changes publishes its
wake-ups, so idle workers and the jobs' streams hear of it at once.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, and_, bindparam, case, or_, select, update
from sqlalchemy.orm import Session

from service.status import JobStatus
from service.store import wakeups
from service.store.sweeps import repo as sweep_repo
from service.store.tables import Job
from service.store.upkeep.db_clock import database_time


# The fence of a worker's writes to the job it holds: this attempt, this worker, still running.
# Its values are bound at execution (:func:`fence_values`), so a statement built with it once
# serves every job (``queue_repo._lease_update``). The names are shared: a statement holding
# two fences would bind one job's values to both, so none holds more than one.
def _fence_of(job_id: Any, attempt: Any, worker_id: Any) -> ColumnElement[bool]:
    return and_(
        Job.id == job_id,
        Job.attempt == attempt,
        Job.worker_id == worker_id,
        Job.status == JobStatus.RUNNING,
    )


FENCE = _fence_of(bindparam("fence_id"), bindparam("fence_attempt"), bindparam("fence_worker"))


def fence_values(job_id: str, attempt: int, worker_id: str) -> dict[str, Any]:
    """:data:`FENCE`'s values for this job, attempt and worker."""
    return {"fence_id": job_id, "fence_attempt": attempt, "fence_worker": worker_id}


def fence(job_id: str, attempt: int, worker_id: str) -> ColumnElement[bool]:
    """:data:`FENCE`'s clause with these values, for statements built per call."""
    return _fence_of(job_id, attempt, worker_id)


def cancel_asked(session: Session, job_id: str, attempt: int, worker_id: str) -> bool | None:
    """Whether a cancel was asked of the job this worker runs as ``attempt`` (None: it runs it
    no longer, as the finish's fenced write then finds), its row locked until the transaction
    ends. A cancel asked after the worker's last look (its last flush; the final evaluation and
    the checkpoint's write come after) was answered while the job ran, so it must still win;
    and a cancel that comes meanwhile locks the row too (:func:`service.store.job_repo.lock_job`),
    so it waits, then finds the job ended (409), never answers 200 for a job that succeeds."""
    stmt = select(Job.cancel_requested).where(fence(job_id, attempt, worker_id))
    asked: bool | None = session.scalar(stmt.with_for_update())
    return asked


def lease_expired() -> ColumnElement[bool]:
    """Running, with its lease over on the database's clock: its worker stopped renewing it."""
    return and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at <= database_time())


def claimable() -> ColumnElement[bool]:
    """A job a worker may take: queued, or running with an expired lease, with attempts left
    and no cancel asked: the rule of :func:`service.store.queue_repo.claim_job`, and of the
    other jobs of a pack (:mod:`service.store.packs`)."""
    return and_(
        or_(Job.status == JobStatus.QUEUED, lease_expired()),
        Job.attempt < Job.max_attempts,
        Job.cancel_requested.is_(False),
    )


def claimed(*, worker_id: Any, device: Any, now: Any, lease_s: Any) -> dict[str, Any]:
    """What a claim writes: the job runs as its next attempt, held by ``worker_id`` for
    ``lease_s`` seconds from now (values, or bound parameters of a statement built once)."""
    return {
        "status": JobStatus.RUNNING,
        "attempt": Job.attempt + 1,
        "worker_id": worker_id,
        "device": device,
        "started_at": now,
        "heartbeat_at": now,
        "lease_expires_at": database_time(lease_s),
        "error": None,
    }


@functools.cache
def claim_statement() -> Any:
    """The UPDATE of :func:`service.store.queue_repo.claim_job`, built once (its values are
    parameters): building and hashing it took a third of a claim."""
    now = bindparam("now", type_=Job.started_at.type)
    pick = (
        select(Job.id)
        .where(claimable())
        .order_by(Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(Job)
        .where(Job.id == pick, claimable())
        .values(
            claimed(
                worker_id=bindparam("worker_id"),
                device=bindparam("device"),
                now=now,
                lease_s=bindparam("lease_s", type_=Float()),
            )
        )
        .returning(Job)
        .execution_options(synchronize_session=False)
    )


def expire_lost_jobs(session: Session, *, now: datetime, job_id: str | None = None) -> int:
    """Settle the jobs whose worker vanished (their lease ran out), or only ``job_id`` when
    given (a cancel of it, whose row the caller holds); returns how many. ``now`` is the end
    time of those that end; whether a lease ran out is the database clock's to say.

    One UPDATE for all three outcomes: a cancelled-while-running job ends ``cancelled``, one
    that has used up its attempts ends ``failed``, the others go back to the queue for their
    next attempt (resuming where the lost one left its training state); the sweeps of those
    that ended are settled (:func:`sweep_repo.settle_all`). Whoever runs it, a worker's claim
    or any other host, the change publishes its wake-ups: idle workers learn that a job is
    claimable again, and the jobs' event streams that their status moved.
    """
    one = {} if job_id is None else {"job_id": job_id}
    rows = session.execute(_expire_statement(bool(one)), {"now": now, **one}).all()
    for job_id, status, _ in rows:
        wakeups.publish(session, wakeups.JOB_PROGRESS, job_id)
        if status == JobStatus.QUEUED:
            wakeups.publish(session, wakeups.JOB_QUEUED)
    ended = [sweep_id for _, status, sweep_id in rows if status != JobStatus.QUEUED]
    sweep_repo.settle_all(session, ended, now)
    return len(rows)


@functools.cache
def _expire_statement(one: bool) -> Any:
    """The UPDATE of :func:`expire_lost_jobs`, built once with ``now`` (and the ``job_id`` of
    ``one``) as parameters: a worker's settling claims run it, and building and hashing it
    anew took about a third of its time."""
    now = bindparam("now", type_=Job.finished_at.type)
    ending = or_(Job.cancel_requested.is_(True), Job.attempt >= Job.max_attempts)
    expired = [lease_expired()]
    if one:
        expired.append(Job.id == bindparam("job_id", type_=Job.id.type))
    # A row another transaction holds is skipped, not waited for (PostgreSQL; SQLite locks
    # the file): a vanished worker's transaction held one, and every claim's settling waited
    # on it, the queue's other jobs unclaimed, until the server ended that transaction.
    free = select(Job.id).where(*expired).with_for_update(skip_locked=True)
    return (
        update(Job)
        .where(*expired, Job.id.in_(free))
        .values(
            status=case(
                (Job.cancel_requested.is_(True), JobStatus.CANCELLED.value),
                (Job.attempt >= Job.max_attempts, JobStatus.FAILED.value),
                else_=JobStatus.QUEUED.value,
            ),
            finished_at=case((ending, now), else_=None),
            error=case(
                (
                    and_(Job.cancel_requested.is_(False), Job.attempt >= Job.max_attempts),
                    "worker lost " + Job.attempt.cast(Job.error.type) + " times",
                ),
                else_=Job.error,
            ),
            worker_id=case((ending, Job.worker_id), else_=None),
            heartbeat_at=case((ending, Job.heartbeat_at), else_=None),
            lease_expires_at=None,
        )
        .returning(Job.id, Job.status, Job.sweep_id)
        .execution_options(synchronize_session=False)
    )
