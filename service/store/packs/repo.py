"""Claim the jobs that can share a step with one a worker has just claimed.

A worker with ``MNIST_PACK_MAX`` > 1 first claims as every worker does
(:func:`service.store.queue_repo.claim_job`: the oldest claimable job, expired leases settled,
its metrics rewound), then, in the same transaction, up to ``limit`` more of the oldest
claimable jobs whose pack fields equal that job's. One UPDATE whose subquery picks the rows
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so a concurrent claim passes over them rather than
waits; SQLite's IMMEDIATE transaction serialises claims), re-checked by the UPDATE's own
``WHERE``: no two workers take the same attempt. The rule for what is claimable and what a
claim writes is queue_repo's own (:mod:`service.store.upkeep.leases`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.store import wakeups
from service.store.queue_repo import rewind_to_epoch
from service.store.tables import Job
from service.store.upkeep.leases import claimable, claimed


def claim_more(
    session: Session,
    *,
    first: Job,
    fields: Sequence[str],
    limit: int,
    worker_id: str,
    lease_s: float,
    device: str,
    now: datetime,
) -> list[Job]:
    """Claim up to ``limit`` more jobs that share ``first``'s ``fields`` and resume epoch;
    oldest first.

    The same resume epoch, because a pack's jobs take their steps together from one epoch
    (:class:`workers.training.packing.Pack`): a retried pack comes back whole, and a job that
    resumes elsewhere waits for a claim of its own. Each claimed job is rewound to its resume
    point, as :func:`~service.store.queue_repo.claim_job` rewinds its job.
    """
    if limit < 1:
        return []
    same = [getattr(Job, name) == getattr(first, name) for name in fields]
    fits = (claimable(now), Job.id != first.id, Job.resume_epoch == first.resume_epoch, *same)
    pick = (
        select(Job.id)
        .where(*fits)
        .order_by(Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(Job)
        .where(Job.id.in_(pick), *fits)
        .values(
            claimed(
                worker_id=worker_id,
                device=device,
                now=now,
                lease_until=now + timedelta(seconds=lease_s),
            )
        )
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    jobs = sorted(session.scalars(stmt).all(), key=lambda job: (job.created_at, job.id))
    for job in jobs:
        rewind_to_epoch(session, job, job.resume_epoch)
        wakeups.publish(session, wakeups.JOB_PROGRESS, job.id)
    return jobs
