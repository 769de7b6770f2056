"""The packed claim, on both backends: the jobs that can share the first's steps come with it,
the others stay queued, and a lone job is claimed alone."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.status import JobStatus
from service.store import queue_repo
from service.store.packs import claim_more
from tests.jobs import queue_job, read_job
from tests.records import lapse_leases

FIELDS = ("epochs", "batch_size", "trainset_size", "testset_size")
SMALL = {"epochs": 2, "batch_size": 32, "trainset_size": 256, "testset_size": 10}


def claim_pack(sessions: sessionmaker[Session], limit: int, lease_s: float = 30.0) -> list[str]:
    """A worker's packed claim: the oldest claimable job and up to ``limit`` more."""
    now = utcnow()
    with sessions.begin() as session:
        first = queue_repo.claim_job(session, worker_id="w", lease_s=lease_s, device="cpu", now=now)
        assert first is not None
        more = claim_more(
            session,
            first=first,
            fields=FIELDS,
            limit=limit,
            worker_id="w",
            lease_s=lease_s,
            device="cpu",
            now=now,
        )
        return [first.id, *(job.id for job in more)]


def test_a_lone_job_is_claimed_alone(sessions: sessionmaker[Session]) -> None:
    only = queue_job(sessions, SMALL)
    assert claim_pack(sessions, limit=7) == [only]
    assert read_job(sessions, only).status == JobStatus.RUNNING


def test_only_jobs_that_share_the_first_ones_step_come_with_it(
    sessions: sessionmaker[Session],
) -> None:
    first = queue_job(sessions, {**SMALL, "seed": 1})
    same = [queue_job(sessions, {**SMALL, "seed": s, "learning_rate": 0.002}) for s in (2, 3, 4)]
    other = queue_job(sessions, {**SMALL, "epochs": 3})
    assert claim_pack(sessions, limit=2) == [first, *same[:2]]  # oldest first, up to the limit
    assert read_job(sessions, same[2]).status == JobStatus.QUEUED
    assert read_job(sessions, other).status == JobStatus.QUEUED


def test_a_job_whose_lease_ran_out_is_claimable_into_a_pack(
    sessions: sessionmaker[Session],
) -> None:
    lost = queue_job(sessions, {**SMALL, "seed": 1})
    assert claim_pack(sessions, limit=7) == [lost]
    lapse_leases(sessions)  # its worker then went silent
    fresh = queue_job(sessions, {**SMALL, "seed": 2})
    packed = claim_pack(sessions, limit=7)
    assert sorted(packed) == sorted([lost, fresh])
    assert read_job(sessions, lost).attempt == 2
