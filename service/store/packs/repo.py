"""Claim the jobs that can share a step with one a worker has just claimed.

A worker with ``MNIST_PACK_MAX`` > 1 first claims as every worker does
(:func:`service.store.queue_repo.claim_job`: the oldest claimable job, expired leases settled,
its metrics rewound), then, in the same transaction, up to ``limit`` more of the oldest
claimable jobs whose pack fields equal that job's. A SELECT picks the rows (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so a concurrent claim passes over them rather than waits; SQLite's
IMMEDIATE transaction serialises claims), then an UPDATE of those ids re-checks them in its
own ``WHERE``: no two workers take the same attempt. The rule for what is claimable and what a
claim writes is queue_repo's own (:mod:`service.store.upkeep.leases`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from service.store import wakeups
from service.store.queue_repo import rewind_to_epoch
from service.store.tables import Job
from service.store.upkeep.leases import claimable, claimed


@functools.cache
def _another_claimable() -> Any:
    """Whether any job but the one just claimed is claimable, built once: a worker's claim
    asks it whenever it packs, and a lone job (the common case) spares the pack's UPDATE,
    which, built for its first job's fields, took ~2 ms of a ~7 ms claim (measured)."""
    return select(Job.id).where(claimable(), Job.id != bindparam("first")).limit(1)


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
    if limit < 1 or session.scalar(_another_claimable(), {"first": first.id}) is None:
        return []
    same = [getattr(Job, name) == getattr(first, name) for name in fields]
    fits = (claimable(), Job.id != first.id, Job.resume_epoch == first.resume_epoch, *same)
    pick = (
        select(Job.id)
        .where(*fits)
        .order_by(Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    # The rows are picked (and, on PostgreSQL, locked) first, then updated by id: as a
    # subquery of the UPDATE, PostgreSQL could run the LIMIT's pick more than once and claim
    # more than ``limit`` jobs (tests/service/store/packs/test_repo.py).
    picked = list(session.scalars(pick))
    if not picked:
        return []
    stmt = (
        update(Job)
        .where(Job.id.in_(picked), *fits)
        .values(claimed(worker_id=worker_id, device=device, now=now, lease_s=lease_s))
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    jobs = sorted(session.scalars(stmt).all(), key=lambda job: (job.created_at, job.id))
    for job in jobs:
        rewind_to_epoch(session, job, job.resume_epoch)
        wakeups.publish(session, wakeups.JOB_PROGRESS, job.id)
    return jobs
