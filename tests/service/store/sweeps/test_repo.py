"""A sweep ends with its last trial, whichever path ends it (a worker's finish, a cancel, a
last attempt lost; not one handed back), on both backends; its best trial and its alias."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain import sweeps
from service.errors import Conflict
from service.schemas.sweeps import SweepCreate
from service.status import JobStatus, SweepStatus
from service.store import job_repo, model_repo, queue_repo
from service.store.sweeps import repo as sweep_repo
from service.store.tables import Job, Sweep
from service.store.upkeep import leases
from tests.records import lapse_leases
from tests.support import together

LIMITS = {"max_trials": 256, "max_attempts": 1, "max_queued": 1000, "max_steps": 1_000_000}


def new_sweep(sessions: sessionmaker[Session], trials: int, promote: str | None = None) -> str:
    body = SweepCreate.model_validate({"grid": {"seed": list(range(trials))}, "promote": promote})
    with sessions() as session:
        return sweeps.create(session, body, **LIMITS).id


def claim(sessions: sessionmaker[Session], worker: str, lease_s: float = 30.0) -> Job:
    with sessions.begin() as session:
        job = queue_repo.claim_job(
            session, worker_id=worker, lease_s=lease_s, device="cpu", now=utcnow()
        )
    assert job is not None
    return job


def finish(
    sessions: sessionmaker[Session], job: Job, status: JobStatus, accuracy: float | None = None
) -> None:
    with sessions.begin() as session:
        if accuracy is not None:
            session.execute(update(Job).where(Job.id == job.id).values(accuracy=accuracy))
        queue_repo.finish_job(
            session,
            job_id=job.id,
            attempt=job.attempt,
            worker_id=job.worker_id or "",
            status=status,
            now=utcnow(),
            checkpoint=f"{job.id}.pt" if status == JobStatus.SUCCEEDED else None,
        )


def sweep_row(sessions: sessionmaker[Session], sweep_id: str) -> Sweep:
    with sessions() as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep is not None
        return sweep


def alias_target(sessions: sessionmaker[Session], name: str) -> str | None:
    with sessions() as session:
        alias = model_repo.get_alias(session, name)
        return None if alias is None else alias.job_id


def test_the_last_finish_ends_it_and_promotes_the_best(sessions: sessionmaker[Session]) -> None:
    sweep_id = new_sweep(sessions, 3, promote="production")
    a, b, c = claim(sessions, "w1"), claim(sessions, "w2"), claim(sessions, "w3")
    finish(sessions, a, JobStatus.SUCCEEDED, accuracy=0.5)
    finish(sessions, b, JobStatus.SUCCEEDED, accuracy=0.9)
    assert sweep_row(sessions, sweep_id).status == SweepStatus.RUNNING
    assert alias_target(sessions, "production") is None
    finish(sessions, c, JobStatus.FAILED)
    ended = sweep_row(sessions, sweep_id)
    assert ended.status == SweepStatus.SUCCEEDED and ended.finished_at is not None
    assert alias_target(sessions, "production") == b.id
    with sessions() as session:
        best = sweeps.read(session, sweep_id).best
    assert best is not None and (best.job_id, best.accuracy) == (b.id, 0.9)


def test_of_equal_accuracies_the_earliest_trial_is_best(sessions: sessionmaker[Session]) -> None:
    sweep_id = new_sweep(sessions, 3, promote="tied")
    first, second, third = (claim(sessions, f"w{i}") for i in range(3))
    for job in (third, second, first):  # finishing order does not matter
        finish(sessions, job, JobStatus.SUCCEEDED, accuracy=0.75)
    assert alias_target(sessions, "tied") == first.id
    with sessions() as session:
        best = sweeps.read(session, sweep_id).best
    assert best is not None and best.job_id == first.id


def test_no_success_fails_it_and_moves_no_alias(sessions: sessionmaker[Session]) -> None:
    sweep_id = new_sweep(sessions, 2, promote="production")
    a, b = claim(sessions, "w1"), claim(sessions, "w2")
    finish(sessions, a, JobStatus.FAILED)
    finish(sessions, b, JobStatus.CANCELLED)
    assert sweep_row(sessions, sweep_id).status == SweepStatus.FAILED
    assert alias_target(sessions, "production") is None


def test_a_last_attempt_handed_back_runs_again(sessions: sessionmaker[Session]) -> None:
    """A host's fault (its checkpoint folder full) spends none of the trial's attempts: it
    failed the trial, and the sweep, for a fault of seconds."""
    sweep_id = new_sweep(sessions, 1)
    job = claim(sessions, "w1")  # its last attempt (LIMITS)
    with sessions.begin() as session:
        again = queue_repo.hand_back(
            session,
            job_id=job.id,
            attempt=job.attempt,
            worker_id="w1",
            now=utcnow(),
            reason="disk gone",
        )
    assert again is None  # it runs again
    with sessions() as session:
        queued = session.get_one(Job, job.id)
        assert (queued.status, queued.error) == (JobStatus.QUEUED, "disk gone; retrying")
        assert queued.max_attempts == job.attempt + 1
    assert sweep_row(sessions, sweep_id).status == SweepStatus.RUNNING
    retried = claim(sessions, "w2")
    assert (retried.id, retried.attempt) == (job.id, job.attempt + 1)  # a new fence


def test_a_host_fault_that_lasts_fails_the_trial_once_its_free_hand_backs_are_spent(
    sessions: sessionmaker[Session],
) -> None:
    """With no bound, a fault that lasted on every host gave the job back for good: never
    failed, its sweep never ended, its attempts counting up without end."""
    sweep_id = new_sweep(sessions, 1)
    for fault in range(queue_repo.FREE_HOST_FAULTS + 1):
        job = claim(sessions, f"w{fault}")
        with sessions.begin() as session:
            ended = queue_repo.hand_back(
                session,
                job_id=job.id,
                attempt=job.attempt,
                worker_id=f"w{fault}",
                now=utcnow(),
                reason="disk gone",
            )
        if fault < queue_repo.FREE_HOST_FAULTS:
            assert ended is None and sweep_row(sessions, sweep_id).status == SweepStatus.RUNNING
    assert ended is JobStatus.FAILED
    with sessions() as session:
        failed = session.get_one(Job, job.id)
    last = queue_repo.FREE_HOST_FAULTS + 1
    assert (failed.status, failed.attempt, failed.host_faults) == (JobStatus.FAILED, last, last)
    assert failed.error == f"disk gone; gave up after {last} attempts"
    assert sweep_row(sessions, sweep_id).status == SweepStatus.FAILED


def test_a_lost_last_attempt_ends_it(sessions: sessionmaker[Session]) -> None:
    sweep_id = new_sweep(sessions, 2)
    kept = claim(sessions, "w2")
    lost = claim(sessions, "w1")
    finish(sessions, kept, JobStatus.SUCCEEDED, accuracy=0.8)
    lapse_leases(sessions, lost.id)
    with sessions.begin() as session:
        assert leases.expire_lost_jobs(session, now=utcnow()) == 1
    with sessions() as session:
        assert session.get(Job, lost.id).status == JobStatus.FAILED  # type: ignore[union-attr]
    assert sweep_row(sessions, sweep_id).status == SweepStatus.SUCCEEDED


def test_cancelling_the_last_queued_trial_ends_it(sessions: sessionmaker[Session]) -> None:
    sweep_id = new_sweep(sessions, 2)
    finish(sessions, claim(sessions, "w1"), JobStatus.SUCCEEDED, accuracy=0.6)
    with sessions.begin() as session:
        queued = session.query(Job).filter(Job.status == JobStatus.QUEUED).one()
        job_repo.request_cancel(session, queued, now=utcnow())
    # Its trials were cancelled one by one, not the sweep: it ends by what they did.
    assert sweep_row(sessions, sweep_id).status == SweepStatus.SUCCEEDED


def test_a_sweep_whose_trials_were_all_cancelled_one_by_one_ends_cancelled(
    sessions: sessionmaker[Session],
) -> None:
    """It ended "failed", with no trial failed."""
    sweep_id = new_sweep(sessions, 2, promote="production")
    finish(sessions, claim(sessions, "w1"), JobStatus.CANCELLED)
    with sessions.begin() as session:
        queued = session.query(Job).filter(Job.status == JobStatus.QUEUED).one()
        job_repo.request_cancel(session, queued, now=utcnow())
    assert sweep_row(sessions, sweep_id).status == SweepStatus.CANCELLED
    assert alias_target(sessions, "production") is None


def test_a_cancelled_sweep_ends_when_its_running_trial_stops(
    sessions: sessionmaker[Session],
) -> None:
    sweep_id = new_sweep(sessions, 2, promote="production")
    running = claim(sessions, "w1")
    with sessions() as session:
        view = sweeps.cancel(session, sweep_id)
    assert view.status is SweepStatus.RUNNING  # its running trial has not stopped yet
    assert [t.status for t in view.trials] == [JobStatus.RUNNING, JobStatus.CANCELLED]
    with sessions.begin() as session:
        assert queue_repo.heartbeat(
            session, job_id=running.id, attempt=1, worker_id="w1", lease_s=30, now=utcnow()
        )  # the worker learns of the cancel
    finish(sessions, running, JobStatus.SUCCEEDED, accuracy=0.9)  # it finished anyway
    assert sweep_row(sessions, sweep_id).status == SweepStatus.CANCELLED
    assert alias_target(sessions, "production") is None


def test_trials_ending_at_once_end_the_sweep_once(sessions: sessionmaker[Session]) -> None:
    for _ in range(3):
        sweep_id = new_sweep(sessions, 4, promote="race")
        jobs = [claim(sessions, f"w{i}") for i in range(4)]
        together(
            [
                lambda job=job: finish(sessions, job, JobStatus.SUCCEEDED, accuracy=0.5)  # type: ignore[misc]
                for job in jobs
            ]
        )
        ended = sweep_row(sessions, sweep_id)
        assert ended.status == SweepStatus.SUCCEEDED, "no finish saw the others'"
        assert alias_target(sessions, "race") == jobs[0].id


def test_settling_an_ended_sweep_changes_nothing(sessions: sessionmaker[Session]) -> None:
    sweep_id = new_sweep(sessions, 1)
    finish(sessions, claim(sessions, "w1"), JobStatus.FAILED)
    before = sweep_row(sessions, sweep_id).finished_at
    with sessions.begin() as session:
        sweep_repo.settle(session, sweep_id, utcnow() + timedelta(hours=1))
    assert sweep_row(sessions, sweep_id).finished_at == before


def ask_cancel(sessions: sessionmaker[Session], job: Job) -> None:
    with sessions.begin() as session:
        locked = job_repo.lock_job(session, job.id)
        assert locked is not None
        job_repo.request_cancel(session, locked, now=utcnow())


@pytest.mark.parametrize("way", ["release", "hand back"])
def test_a_trial_given_back_after_a_cancel_ends_cancelled_and_ends_it(
    sessions: sessionmaker[Session], way: str
) -> None:
    """A cancel asked while the trial ran, then its worker gives it back (a shutdown, a host
    fault): queued again no worker would ever claim it, and the sweep would run forever."""
    sweep_id = new_sweep(sessions, 1)
    job = claim(sessions, "w1")
    ask_cancel(sessions, job)
    now = utcnow()
    with sessions.begin() as session:
        if way == "release":
            queue_repo.release_job(
                session, job_id=job.id, attempt=job.attempt, worker_id="w1", now=now
            )
        else:
            again = queue_repo.hand_back(
                session, job_id=job.id, attempt=job.attempt, worker_id="w1", now=now, reason="x"
            )
            assert again is JobStatus.CANCELLED
    with sessions() as session:
        ended = session.get(Job, job.id)
        assert ended is not None
        assert (ended.status, ended.finished_at is not None) == (JobStatus.CANCELLED, True)
    assert sweep_row(sessions, sweep_id).status == SweepStatus.CANCELLED  # as its one trial


def test_a_sweep_is_tallied_alike_in_its_answer_and_in_a_page_of_sweeps(
    sessions: sessionmaker[Session],
) -> None:
    sweep_id = new_sweep(sessions, 5)
    a, b, _ = claim(sessions, "w1"), claim(sessions, "w2"), claim(sessions, "w3")
    finish(sessions, a, JobStatus.SUCCEEDED, accuracy=0.5)
    finish(sessions, b, JobStatus.FAILED)
    other = new_sweep(sessions, 2)
    with sessions() as session:
        answer = sweeps.read(session, sweep_id)
        page = sweeps.list_page(session, status=None, limit=10, cursor=None)
    counted = {s: n for s, n in answer.trials_by_status.items() if n}
    assert counted == {
        JobStatus.SUCCEEDED: 1,
        JobStatus.FAILED: 1,
        JobStatus.RUNNING: 1,
        JobStatus.QUEUED: 2,
    }
    listed = {s.id: s for s in page.sweeps}
    assert listed[sweep_id].trials_by_status == answer.trials_by_status
    assert listed[sweep_id].best == answer.best and answer.best is not None
    assert answer.best.job_id == a.id
    assert listed[other].trials_by_status[JobStatus.QUEUED] == 2 and listed[other].best is None


def cancel_or_conflict(sessions: sessionmaker[Session], sweep_id: str) -> str:
    with sessions() as session:
        try:
            return sweeps.cancel(session, sweep_id).status
        except Conflict:
            return "conflict"


def test_of_two_cancels_at_once_the_second_is_told_the_sweep_ended(
    sessions: sessionmaker[Session],
) -> None:
    for _ in range(3):
        sweep_id = new_sweep(sessions, 3)  # all queued: a cancel ends it
        cancel = functools.partial(cancel_or_conflict, sessions, sweep_id)
        answers = together([cancel, cancel])
        assert sorted(answers) == ["cancelled", "conflict"]
        assert sweep_row(sessions, sweep_id).status == SweepStatus.CANCELLED


def test_a_cancel_and_a_trials_finish_at_once_end_the_sweep_cancelled(
    sessions: sessionmaker[Session],
) -> None:
    for _ in range(3):
        sweep_id = new_sweep(sessions, 3)
        job = claim(sessions, "w1")
        calls: list[Callable[[], object]] = [
            functools.partial(cancel_or_conflict, sessions, sweep_id),
            functools.partial(finish, sessions, job, JobStatus.SUCCEEDED, accuracy=0.5),
        ]
        answers = together(calls)
        assert answers[0] in ("running", "cancelled")  # the finish came after, or before
        assert sweep_row(sessions, sweep_id).status == SweepStatus.CANCELLED
