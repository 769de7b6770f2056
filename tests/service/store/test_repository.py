"""The repository on both backends: queue claims, fencing, expiry, paging, metrics."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from service.api.deps import job_for_update_or_404
from service.clock import utcnow
from service.domain import jobs as jobs_domain
from service.errors import InvalidInput, LeaseLost
from service.schemas import JobCreate
from service.status import JobStatus
from service.steps import StepPlan
from service.store import job_repo, metric_repo, queue_repo
from service.store.tables import Job, TrainStep
from service.store.upkeep import leases
from tests.records import lapse_leases

LEASE_S = 30.0


def add_job(sessions: sessionmaker[Session], **params: int) -> str:
    with sessions.begin() as session:
        return job_repo.create_job(session, JobCreate(**params), max_attempts=3, now=utcnow()).id


def claim(sessions: sessionmaker[Session], worker: str, **kw: object) -> Job | None:
    with sessions.begin() as session:
        return queue_repo.claim_job(
            session,
            worker_id=worker,
            lease_s=float(kw.get("lease_s", LEASE_S)),  # type: ignore[arg-type]
            device="cpu",
            now=kw.get("now", utcnow()),  # type: ignore[arg-type]
        )


def step_rows(steps: Sequence[int], epoch: int = 1) -> list[dict[str, Any]]:
    """Steps as a worker reports them (each with a loss of its own)."""
    return [{"step": s, "epoch": epoch, "loss": 1.0 / s, "examples_seen": 64 * s} for s in steps]


def flush(
    sessions: sessionmaker[Session],
    job: Job,
    worker: str,
    steps: range,
    epoch: int = 1,
    epochs: Sequence[dict[str, Any]] = (),
) -> bool:
    rows = step_rows(steps, epoch)
    with sessions.begin() as session:
        return queue_repo.record_progress(
            session,
            job_id=job.id,
            attempt=job.attempt,
            worker_id=worker,
            progress=queue_repo.Progress(
                steps=rows, epochs=epochs, step=steps.stop - 1, epoch=0, accuracy=None
            ),
            lease_s=LEASE_S,
            now=utcnow(),
        )


def test_total_steps_round_up_per_epoch() -> None:
    assert StepPlan.of(JobCreate()).total_steps == 157 * 3
    assert StepPlan.of(JobCreate(trainset_size=64, batch_size=64, epochs=2)).total_steps == 2
    assert StepPlan.of(JobCreate(trainset_size=65, batch_size=64, epochs=1)).total_steps == 2


def test_claim_takes_the_oldest_queued_job_once(sessions: sessionmaker[Session]) -> None:
    first, second = add_job(sessions), add_job(sessions)
    a, b = claim(sessions, "w1"), claim(sessions, "w2")
    assert a is not None and b is not None
    assert (a.id, a.attempt, a.worker_id, a.status) == (first, 1, "w1", JobStatus.RUNNING)
    assert (b.id, b.worker_id) == (second, "w2")
    assert claim(sessions, "w3") is None


def test_concurrent_claims_never_share_a_job(sessions: sessionmaker[Session]) -> None:
    ids = {add_job(sessions) for _ in range(12)}
    claimed: list[str] = []
    lock = threading.Lock()

    def grab(worker: str) -> None:
        while (job := claim(sessions, worker)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_fenced_writes_refuse_a_worker_that_lost_the_job(sessions: sessionmaker[Session]) -> None:
    add_job(sessions)
    start = utcnow()
    job = claim(sessions, "old", now=start)
    assert job is not None
    flush(sessions, job, "old", range(1, 4))

    # The lease expires; another worker takes the job over as attempt 2 and starts over.
    lapse_leases(sessions)
    retry = claim(sessions, "new")
    assert retry is not None and retry.id == job.id and retry.attempt == 2
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(TrainStep)) == 0

    with pytest.raises(LeaseLost):
        flush(sessions, job, "old", range(4, 6))
    with pytest.raises(LeaseLost), sessions.begin() as session:
        queue_repo.finish_job(
            session,
            job_id=job.id,
            attempt=job.attempt,
            worker_id="old",
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
        )
    # The late writes left nothing behind; the new owner writes normally.
    flush(sessions, retry, "new", range(1, 3))
    with sessions() as session:
        steps = session.scalars(select(TrainStep.step).order_by(TrainStep.step)).all()
        assert steps == [1, 2]
        assert session.get(Job, job.id).status == JobStatus.RUNNING  # type: ignore[union-attr]


def test_duplicate_steps_are_rejected_by_the_schema(sessions: sessionmaker[Session]) -> None:
    add_job(sessions)
    job = claim(sessions, "w")
    assert job is not None
    flush(sessions, job, "w", range(1, 3))
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        flush(sessions, job, "w", range(2, 4))


def test_a_job_out_of_attempts_fails_with_the_reason(sessions: sessionmaker[Session]) -> None:
    job_id = add_job(sessions)
    for attempt in (1, 2, 3):
        job = claim(sessions, f"w{attempt}")
        assert job is not None and job.attempt == attempt
        lapse_leases(sessions)
    assert claim(sessions, "w4") is None
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == JobStatus.FAILED
        assert job.error == "worker lost 3 times"


def test_an_expired_lease_sends_the_job_back_to_the_queue(sessions: sessionmaker[Session]) -> None:
    job_id = add_job(sessions)
    start = utcnow()
    assert claim(sessions, "lost", now=start) is not None
    with sessions.begin() as session:  # the lease still holds, whatever the settler's clock
        assert leases.expire_lost_jobs(session, now=start + timedelta(hours=1)) == 0
    lapse_leases(sessions)
    with sessions.begin() as session:
        assert leases.expire_lost_jobs(session, now=utcnow()) == 1
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.QUEUED
        assert job.worker_id is None and job.lease_expires_at is None and job.finished_at is None
    retry = claim(sessions, "next")
    assert retry is not None and retry.id == job_id and retry.attempt == 2


def test_an_expired_lease_of_a_cancelled_job_ends_it(sessions: sessionmaker[Session]) -> None:
    job_id = add_job(sessions)
    start = utcnow()
    assert claim(sessions, "lost", now=start) is not None
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job_repo.request_cancel(session, job, now=start)
    lapse_leases(sessions)
    with sessions.begin() as session:
        assert leases.expire_lost_jobs(session, now=utcnow()) == 1
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.CANCELLED and job.finished_at
    assert claim(sessions, "next") is None


def test_a_cancel_of_a_job_whose_lease_ran_out_ends_it_at_once(
    sessions: sessionmaker[Session],
) -> None:
    """Its worker is gone, and only a worker's claim settled a lost lease: with no worker
    left the job stayed running, the cancel answered with it running, for good."""
    job_id, other_id = add_job(sessions), add_job(sessions)
    start = utcnow()
    assert claim(sessions, "lost", now=start) is not None
    assert claim(sessions, "lost too", now=start) is not None
    lapse_leases(sessions)
    later = utcnow()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        ended = job_repo.request_cancel(session, job, now=later)
        assert (ended.status, ended.finished_at) == (JobStatus.CANCELLED, later)
    with sessions() as session:  # the other lost job is the next claim's to settle, not this
        assert session.get_one(Job, other_id).status == JobStatus.RUNNING


def test_a_claim_that_does_not_settle_still_takes_an_expired_job_and_ends_none(
    sessions: sessionmaker[Session],
) -> None:
    """A worker settles lost leases once per poll interval, not in every claim: the claims in
    between take an expired job all the same, and leave one that cannot run for the next
    settling claim to end."""
    retried, cancelled = add_job(sessions), add_job(sessions)
    start = utcnow()
    for _ in range(2):
        assert claim(sessions, "lost", now=start) is not None
    with sessions.begin() as session:
        job = session.get(Job, cancelled)
        assert job is not None
        job_repo.request_cancel(session, job, now=start)
    lapse_leases(sessions)
    later = utcnow()
    with sessions.begin() as session:
        taken = queue_repo.claim_job(
            session, worker_id="next", lease_s=LEASE_S, device="cpu", now=later, settle_leases=False
        )
        assert taken is not None and taken.id == retried and taken.attempt == 2
    with sessions.begin() as session:
        none = queue_repo.claim_job(
            session, worker_id="next", lease_s=LEASE_S, device="cpu", now=later, settle_leases=False
        )
        assert none is None
    with sessions() as session:
        job = session.get(Job, cancelled)
        assert job is not None and job.status == JobStatus.RUNNING  # left for the next settle
    assert claim(sessions, "next", now=later) is None  # settles
    with sessions() as session:
        job = session.get(Job, cancelled)
        assert job is not None and job.status == JobStatus.CANCELLED and job.finished_at


def test_only_a_flush_of_steps_alone_commits_without_waiting_for_the_disk(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite never waits for the disk at commit (synchronous=NORMAL)")
    add_job(sessions)
    job = claim(sessions, "w")
    assert job is not None
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    def relaxed() -> bool:
        found = any("synchronous_commit" in s for s in statements)
        statements.clear()
        return found

    flush(sessions, job, "w", range(1, 4))
    assert relaxed()
    flush(
        sessions, job, "w", range(4, 4), epochs=[{"epoch": 1, "accuracy": 0.5, "examples_seen": 64}]
    )
    assert not relaxed()
    with sessions.begin() as session:
        queue_repo.finish_job(
            session,
            job_id=job.id,
            attempt=1,
            worker_id="w",
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
        )
    assert not relaxed()


def test_cancel_a_queued_job_and_flag_a_running_one(sessions: sessionmaker[Session]) -> None:
    queued_id, running_id = add_job(sessions), add_job(sessions)
    with sessions.begin() as session:
        queued = session.get(Job, queued_id)
        assert queued is not None
        assert job_repo.request_cancel(session, queued, now=utcnow()).status == "cancelled"
    running = claim(sessions, "w")
    assert running is not None and running.id == running_id
    with sessions.begin() as session:
        job = session.get(Job, running_id)
        assert job is not None
        assert job_repo.request_cancel(session, job, now=utcnow()).status == "running"
    assert flush(sessions, running, "w", range(1, 2)) is True
    assert claim(sessions, "w2") is None  # the cancelled job never starts


def test_release_requeues_without_spending_an_attempt(sessions: sessionmaker[Session]) -> None:
    add_job(sessions)
    job = claim(sessions, "w")
    assert job is not None
    with sessions.begin() as session:
        queue_repo.release_job(session, job_id=job.id, attempt=1, worker_id="w", now=utcnow())
    again = claim(sessions, "w2")
    assert again is not None and again.id == job.id
    # The next run is attempt 2 (a number is never used twice), of one attempt more.
    assert (again.attempt, again.max_attempts) == (2, job.max_attempts + 1)


def test_list_jobs_pages_newest_first(sessions: sessionmaker[Session]) -> None:
    ids = [add_job(sessions) for _ in range(5)]
    seen: list[str] = []
    cursor = None
    with sessions() as session:
        while True:
            page, cursor = job_repo.list_jobs(session, status=None, limit=2, cursor=cursor)
            seen += [j.id for j in page]
            if cursor is None:
                break
        assert seen == ids[::-1]
        queued, _ = job_repo.list_jobs(session, status=JobStatus.RUNNING, limit=10, cursor=None)
        assert queued == []
        with pytest.raises(InvalidInput):
            job_repo.list_jobs(session, status=None, limit=2, cursor="not-a-cursor")


def test_read_steps_after_a_step_in_order(sessions: sessionmaker[Session]) -> None:
    add_job(sessions)
    job = claim(sessions, "w")
    assert job is not None
    flush(sessions, job, "w", range(1, 11))
    with sessions() as session:
        assert [
            r["step"] for r in metric_repo.read_steps(session, job.id, after_step=7, limit=10)
        ] == [
            8,
            9,
            10,
        ]
        assert [
            r["step"] for r in metric_repo.read_steps(session, job.id, after_step=0, limit=3)
        ] == [
            1,
            2,
            3,
        ]


def test_a_flush_stores_its_steps_exactly_as_a_row_by_row_insert_does(
    sessions: sessionmaker[Session],
) -> None:
    """Each database's own insert (PostgreSQL: one statement over arrays; SQLite: the driver's
    executemany of tuples) against SQLAlchemy's executemany it replaces: the same rows, every
    loss to the bit."""
    losses = [
        5e-324,
        2.2250738585072014e-308,
        1 / 3,
        0.1,
        2.302585092994046,
        1.7976931348623157e308,
    ]
    rows = [
        {"step": s, "epoch": 1 + s // 4, "loss": x, "examples_seen": 2**31 - 1 - s}
        for s, x in enumerate(losses, start=1)
    ]
    ids = [add_job(sessions), add_job(sessions)]
    with sessions.begin() as session:
        metric_repo.insert_steps(session, ids[0], rows)
        session.connection().execute(insert(TrainStep), [{"job_id": ids[1], **r} for r in rows])
    with sessions() as session:
        stored = [metric_repo.read_steps(session, i, after_step=0, limit=100) for i in ids]
    assert stored[0] == stored[1] == rows
    assert [r["loss"].hex() for r in stored[0]] == [x.hex() for x in losses]


def test_a_jobs_end_never_sets_its_step_back(sessions: sessionmaker[Session]) -> None:
    """A write behind the loop may land after the steps the ending carries were taken: the
    job keeps the later step."""
    add_job(sessions)
    job = claim(sessions, "w")
    assert job is not None
    flush(sessions, job, "w", range(1, 4))
    flush(sessions, job, "w", range(4, 6))  # the write behind, landed
    older = step_rows(range(1, 4))
    with sessions.begin() as session:
        queue_repo.finish_job(
            session,
            job_id=job.id,
            attempt=job.attempt,
            worker_id="w",
            status=JobStatus.FAILED,
            now=utcnow(),
            error="boom",
            unsynced=older,
        )
    with sessions() as session:
        ended = session.get(Job, job.id)
        assert ended is not None and ended.status == JobStatus.FAILED and ended.step == 5
        steps = metric_repo.read_steps(session, job.id, after_step=0, limit=10)
        assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]


def _succeed(session: Session, job: Job, worker: str) -> JobStatus:
    return queue_repo.finish_job(
        session,
        job_id=job.id,
        attempt=job.attempt,
        worker_id=worker,
        status=JobStatus.SUCCEEDED,
        now=utcnow(),
        checkpoint=f"{job.id}-{job.attempt}.pt",
    )


def _finish(sessions: sessionmaker[Session], job: Job, worker: str) -> JobStatus:
    with sessions.begin() as session:
        return _succeed(session, job, worker)


def _running(sessions: sessionmaker[Session]) -> Job:
    """A new job, claimed by worker ``w``."""
    add_job(sessions)
    job = claim(sessions, "w")
    assert job is not None
    return job


def test_a_cancel_asked_after_the_last_flush_wins_over_success(
    sessions: sessionmaker[Session],
) -> None:
    # The cancel came after the worker's last look at it (its last flush): it was answered 200
    # with the job still running, so the job must not end succeeded.
    job = _running(sessions)
    with sessions.begin() as session:
        job_repo.request_cancel(session, session.get_one(Job, job.id), now=utcnow())
    assert _finish(sessions, job, "w") == JobStatus.CANCELLED
    with sessions() as session:
        ended = session.get_one(Job, job.id)
        assert ended.status == JobStatus.CANCELLED and ended.checkpoint is None
    # Without a cancel, the same finish succeeds and names the weights.
    other = _running(sessions)
    assert _finish(sessions, other, "w") == JobStatus.SUCCEEDED
    with sessions() as session:
        assert session.get_one(Job, other.id).checkpoint == f"{other.id}-1.pt"


def test_a_cancel_waits_for_a_finish_under_way_and_then_finds_the_job_ended(
    sessions: sessionmaker[Session],
) -> None:
    # The cancel route's dependency locks the job (lock_job): a finish that holds the row
    # makes it wait, and it then reads the ended job (409), never a stale running one.
    job = _running(sessions)
    finishing = sessions.begin()
    session = finishing.__enter__()
    try:
        _succeed(session, job, "w")
        seen: list[str] = []

        def cancel() -> None:
            with sessions.begin() as other:
                seen.append(job_for_update_or_404(job.id, other).status)

        canceller = threading.Thread(target=cancel)
        canceller.start()
        canceller.join(timeout=0.5)  # it cannot get past the lock while the finish holds it
        assert canceller.is_alive() and seen == []
    finally:
        finishing.__exit__(None, None, None)  # commits
    canceller.join(timeout=30)
    assert seen == [JobStatus.SUCCEEDED]


def test_a_cancel_that_comes_as_a_job_is_given_back_is_never_lost(
    sessions: sessionmaker[Session],
) -> None:
    # A release looked for a cancel, found none, then queued the job again: a cancel that
    # committed in between left it queued and asked to cancel, which no claim takes, for good.
    # The cancel here is sent just before the release's write that queues the job again.
    job = _running(sessions)
    engine = sessions.kw["bind"]
    answered: list[str] = []

    def cancel() -> None:
        with sessions.begin() as session:
            locked = job_for_update_or_404(job.id, session)  # as the route does
            answered.append(jobs_domain.cancel(session, locked).status)

    canceller = threading.Thread(target=cancel)

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        requeues = statement.startswith("UPDATE jobs SET") and "max_attempts=" in statement
        if requeues and canceller.ident is None:  # once
            canceller.start()
            canceller.join(timeout=1)  # done at once unless the release holds the row

    event.listen(engine, "before_cursor_execute", before)
    try:
        with sessions.begin() as session:
            queue_repo.release_job(session, job_id=job.id, attempt=1, worker_id="w", now=utcnow())
    finally:
        event.remove(engine, "before_cursor_execute", before)
    canceller.join(timeout=30)
    assert answered  # the cancel was answered...
    with sessions() as session:  # ...and holds: the job ended cancelled
        assert session.get_one(Job, job.id).status == JobStatus.CANCELLED
