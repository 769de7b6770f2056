"""Wake-ups on both databases: published in the writing transaction, delivered on commit only,
to the waiters of that topic and key; off, or without a transport, waiters only time out."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import anyio.to_thread
import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.schemas import JobCreate
from service.store import job_repo, queue_repo, wakeups
from service.store.engines import make_engine, make_sessionmaker
from service.store.upkeep import leases
from service.store.wakeups import JOB_PROGRESS, JOB_QUEUED
from tests.records import lapse_leases

WOKEN_WITHIN_S = 10.0  # generous: a wake-up arrives in milliseconds; polling is not involved
QUIET_S = 0.3  # how long a waiter that must not be woken is watched


@pytest.fixture
def publishing(sessions: sessionmaker[Session], db_url: str) -> sessionmaker[Session]:
    wakeups.attach(sessions, db_url, enabled=True)
    return sessions


@pytest.fixture
def listener(db_url: str) -> Iterator[wakeups.Listener]:
    with wakeups.listen(db_url, [JOB_QUEUED, JOB_PROGRESS], enabled=True) as listener:
        assert listener.connected.wait(WOKEN_WITHIN_S), "the listener never got ready"
        yield listener


def publish(sessions: sessionmaker[Session], topic: str, key: str = "") -> None:
    with sessions.begin() as session:
        wakeups.publish(session, topic, key)


def test_a_wake_up_arrives_on_commit_never_before(
    publishing: sessionmaker[Session], listener: wakeups.Listener
) -> None:
    with listener.subscribe(JOB_QUEUED) as queued:
        queued.wait(0)  # forget the wake-up a new listener sends its waiters
        with publishing.begin() as session:
            wakeups.publish(session, JOB_QUEUED)
            assert not queued.wait(QUIET_S), "woken before the transaction committed"
        assert queued.wait(WOKEN_WITHIN_S)
        assert not queued.wait(QUIET_S), "one wake-up woke the waiter twice"


def test_a_rolled_back_transaction_wakes_nobody(
    publishing: sessionmaker[Session], listener: wakeups.Listener
) -> None:
    with listener.subscribe(JOB_QUEUED) as queued:
        queued.wait(0)
        with publishing.begin() as session:
            wakeups.publish(session, JOB_QUEUED)
            session.rollback()
        assert not queued.wait(QUIET_S)
        publish(publishing, JOB_QUEUED)  # the next transaction is not affected
        assert queued.wait(WOKEN_WITHIN_S)


def test_a_job_s_progress_wakes_that_job_s_waiters_only(
    publishing: sessionmaker[Session], listener: wakeups.Listener
) -> None:
    with listener.subscribe(JOB_PROGRESS, "a") as a, listener.subscribe(JOB_PROGRESS, "b") as b:
        a.wait(0)
        b.wait(0)
        publish(publishing, JOB_PROGRESS, "a")
        assert a.wait(WOKEN_WITHIN_S)
        assert not b.wait(QUIET_S)


def test_one_transaction_s_wake_ups_all_arrive_and_a_reused_session_starts_empty(
    publishing: sessionmaker[Session], listener: wakeups.Listener
) -> None:
    """PostgreSQL writes a transaction's notifications together just before it commits:
    every topic and key of it is delivered, and the next transaction of the same session
    carries none of them."""
    with (
        listener.subscribe(JOB_QUEUED) as queued,
        listener.subscribe(JOB_PROGRESS, "a") as a,
        listener.subscribe(JOB_PROGRESS, "b") as b,
    ):
        for waiter in (queued, a, b):
            waiter.wait(0)
        with publishing() as session:
            wakeups.publish(session, JOB_QUEUED)
            wakeups.publish(session, JOB_PROGRESS, "a")
            wakeups.publish(session, JOB_PROGRESS, "b")
            wakeups.publish(session, JOB_PROGRESS, "a")
            session.commit()
            assert all(w.wait(WOKEN_WITHIN_S) for w in (queued, a, b))
            wakeups.publish(session, JOB_PROGRESS, "b")
            session.commit()
            assert b.wait(WOKEN_WITHIN_S)
            assert not queued.wait(QUIET_S) and not a.wait(0), "woken again by a new commit"


def test_a_transaction_wakes_more_keys_than_a_select_has_columns(
    publishing: sessionmaker[Session], listener: wakeups.Listener, db_url: str
) -> None:
    """PostgreSQL allows a SELECT 1664 columns: the wake-ups of a transaction (a sweep's
    cancel wakes each trial's streams) go as rows, so thousands of them still commit."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's wake-ups are datagrams sent after the commit")
    keys = [f"job{i:04d}" for i in range(2000)]
    with (
        listener.subscribe(JOB_PROGRESS, keys[0]) as first,
        listener.subscribe(JOB_PROGRESS, keys[-1]) as last,
    ):
        first.wait(0)
        last.wait(0)
        with publishing.begin() as session:
            for key in keys:
                wakeups.publish(session, JOB_PROGRESS, key)
        assert first.wait(WOKEN_WITHIN_S) and last.wait(WOKEN_WITHIN_S)


@pytest.mark.parametrize("cancelled", [False, True], ids=["requeued", "cancelled"])
def test_an_expired_lease_wakes_idle_workers_and_the_job_s_streams(
    publishing: sessionmaker[Session], listener: wakeups.Listener, cancelled: bool
) -> None:
    start = utcnow()
    with (
        listener.subscribe(JOB_QUEUED) as queued,
        listener.subscribe(JOB_PROGRESS, "setup done") as setup_done,
    ):
        with publishing.begin() as session:
            job = job_repo.create_job(session, JobCreate(), max_attempts=3, now=start)
            queue_repo.claim_job(session, worker_id="lost", lease_s=1.0, device="cpu", now=start)
            if cancelled:
                job_repo.request_cancel(session, job, now=start)
        # Wake-ups arrive in the order they were published: once this one is here, the
        # setup's own (a job queued) are too, and can be forgotten.
        publish(publishing, JOB_PROGRESS, "setup done")
        assert setup_done.wait(WOKEN_WITHIN_S)
        queued.wait(0)
        with listener.subscribe(JOB_PROGRESS, job.id) as progressed:
            lapse_leases(publishing, job.id)
            with publishing.begin() as session:  # any host's transaction, not only a claim
                assert leases.expire_lost_jobs(session, now=utcnow()) == 1
            assert progressed.wait(WOKEN_WITHIN_S), "the job's streams were not told"
        if cancelled:  # it ended: nothing for a worker to claim
            assert not queued.wait(QUIET_S)
        else:
            assert queued.wait(WOKEN_WITHIN_S), "idle workers were not told"


def test_a_wake_up_published_before_the_wait_is_kept_for_it(
    publishing: sessionmaker[Session], listener: wakeups.Listener
) -> None:
    # A worker looks at the queue, a job is queued, then the worker waits: it must not sleep.
    with listener.subscribe(JOB_QUEUED) as queued:
        queued.wait(0)
        publish(publishing, JOB_QUEUED)
        assert queued.wait(WOKEN_WITHIN_S)


def test_a_coroutine_is_woken_through_its_event_loop(
    publishing: sessionmaker[Session], listener: wakeups.Listener
) -> None:
    async def wait_for_news() -> tuple[bool, bool]:
        with listener.subscribe_async(JOB_PROGRESS, "job") as news:
            await news.wait(0)
            await anyio.to_thread.run_sync(publish, publishing, JOB_PROGRESS, "job")
            woken = await news.wait(WOKEN_WITHIN_S)
            return woken, await news.wait(QUIET_S)

    assert anyio.run(wait_for_news) == (True, False)


def test_with_wake_ups_off_nothing_is_published_and_waiters_only_time_out(
    sessions: sessionmaker[Session], db_url: str, listener: wakeups.Listener
) -> None:
    wakeups.attach(sessions, db_url, enabled=False)
    with listener.subscribe(JOB_QUEUED) as queued:
        queued.wait(0)
        publish(sessions, JOB_QUEUED)
        assert not queued.wait(QUIET_S), "published with wake-ups off"
    with wakeups.listen(db_url, [JOB_QUEUED], enabled=False) as off:
        assert type(off) is wakeups.Listener and not off.connected.is_set()
        with off.subscribe(JOB_QUEUED) as queued:
            assert not queued.wait(0.05)


def test_an_in_memory_database_polls() -> None:
    engine = make_engine("sqlite://")
    sessions = make_sessionmaker(engine)
    wakeups.attach(sessions, "sqlite://", enabled=True)
    assert "info" not in sessions.kw
    with wakeups.listen("sqlite://", [JOB_QUEUED], enabled=True) as listener:
        assert type(listener) is wakeups.Listener
    engine.dispose()


def test_a_wake_up_changes_its_key_s_generation_before_it_wakes_anyone(
    publishing: sessionmaker[Session], listener: wakeups.Listener
) -> None:
    # What lets a job's streams share one read (service/domain/event_reads.py): a waiter woken
    # by a wake-up never reads the generation from before it.
    with listener.subscribe(JOB_PROGRESS, "job") as news:
        news.wait(0)
        before = listener.generation(JOB_PROGRESS, "job")
        publish(publishing, JOB_PROGRESS, "job")
        assert news.wait(WOKEN_WITHIN_S)
        assert listener.generation(JOB_PROGRESS, "job") not in (None, before)


def test_a_generation_changes_with_its_own_wake_ups_only_and_never_comes_back() -> None:
    listener = wakeups.Listener()  # wake-ups delivered by hand
    assert listener.generation(JOB_PROGRESS, "a") is None  # nobody waits for it
    with listener.subscribe(JOB_PROGRESS, "a"), listener.subscribe(JOB_PROGRESS, "b"):
        first = listener.generation(JOB_PROGRESS, "a")
        other = listener.generation(JOB_PROGRESS, "b")
        assert first is not None and other is not None
        listener.deliver(JOB_PROGRESS, "a")
        second = listener.generation(JOB_PROGRESS, "a")
        assert second not in (None, first) and listener.generation(JOB_PROGRESS, "b") == other
        listener.deliver(JOB_PROGRESS, "nobody")  # no waiter: nothing is kept for it
        assert listener.generation(JOB_PROGRESS, "nobody") is None
        listener.deliver_all()  # wake-ups may have been missed: every key changes
        assert listener.generation(JOB_PROGRESS, "a") not in (first, second)
        assert listener.generation(JOB_PROGRESS, "b") != other
        seen = {first, second, other, listener.generation(JOB_PROGRESS, "a")}
    assert listener.generation(JOB_PROGRESS, "a") is None
    with listener.subscribe(JOB_PROGRESS, "a"):  # a new waiter: a number never used before
        assert listener.generation(JOB_PROGRESS, "a") not in seen
