"""Leases on the database's clock, whatever the workers' clocks say; and lost leases on
PostgreSQL when a worker vanishes mid-transaction: its rows stay locked until the server ends
its session, and nothing else may wait on them meanwhile."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.schemas import JobCreate
from service.status import JobStatus
from service.store import engines, job_repo, queue_repo
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import Job
from service.store.upkeep import leases
from tests.conftest import OwnPostgres
from tests.records import LEASE_S

# SQLite's clock reads whole milliseconds: a lease may end up to 1 ms before the same lease
# measured from the test's clock.
CLOCK_GRAIN = timedelta(milliseconds=2)


def _claim(sessions: sessionmaker[Session], worker: str, now: Any) -> Job | None:
    with sessions.begin() as session:
        return queue_repo.claim_job(
            session, worker_id=worker, lease_s=LEASE_S, device="cpu", now=now
        )


def test_a_lease_is_on_the_database_clock_whatever_the_workers_clocks(
    sessions: sessionmaker[Session],
) -> None:
    """Workers on several hosts disagree on the time, and a claim may wait (a lock, a slow
    round trip) after its worker read its clock. A lease taken from the worker's clock was
    over before it began for a worker an hour behind (the next claim took its job), and a
    worker an hour ahead took every healthy job of the others."""
    with sessions.begin() as session:
        first, second = (
            job_repo.create_job(session, JobCreate(), max_attempts=3, now=utcnow()).id
            for _ in range(2)
        )
    behind, ahead = utcnow() - timedelta(hours=1), utcnow() + timedelta(hours=1)
    before = utcnow()
    held = _claim(sessions, "behind", now=behind)
    after = utcnow()
    assert held is not None and held.id == first and held.started_at == behind
    lease = timedelta(seconds=LEASE_S)
    assert held.lease_expires_at is not None
    assert before + lease - CLOCK_GRAIN <= held.lease_expires_at <= after + lease
    with sessions.begin() as session:  # the worker ahead settles nothing, takes the next job
        assert leases.expire_lost_jobs(session, now=ahead) == 0
    taken = _claim(sessions, "ahead", now=ahead)
    assert taken is not None and taken.id == second
    assert _claim(sessions, "ahead", now=ahead) is None
    with sessions.begin() as session:  # a renewal from behind runs from the database's now
        before = utcnow()
        queue_repo.heartbeat(
            session, job_id=first, attempt=1, worker_id="behind", lease_s=LEASE_S, now=behind
        )
        renewed = session.get_one(Job, first)
        session.refresh(renewed)
        assert renewed.lease_expires_at is not None
        assert renewed.lease_expires_at >= before + lease - CLOCK_GRAIN


def test_a_claim_takes_the_next_job_past_a_lost_one_whose_row_is_held(
    own_postgres: OwnPostgres,
) -> None:
    """A worker cut off inside a transaction (its COMMIT lost) keeps its job's row locked on
    the server. Every claim's settling of lost leases waited on that row, and no worker
    claimed anything (40-62 s in a review, and unbounded while the server kept the session)."""
    engine = make_engine(own_postgres.url)
    sessions = make_sessionmaker(engine)
    start = utcnow()
    with sessions.begin() as session:
        lost, waiting = (
            job_repo.create_job(session, JobCreate(), max_attempts=3, now=start).id
            for _ in range(2)
        )
    with sessions.begin() as session:
        queue_repo.claim_job(session, worker_id="cut off", lease_s=0.001, device="cpu", now=start)
    claimed: list[Any] = []

    def claim() -> None:
        with sessions.begin() as session:
            job = queue_repo.claim_job(
                session, worker_id="live", lease_s=30, device="cpu", now=start + timedelta(1)
            )
            claimed.append(None if job is None else job.id)

    holder = engine.connect()  # the cut-off worker's transaction, left open on the server
    try:
        holder.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": lost})
        thread = threading.Thread(target=claim, daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the claim waited on the lost job's locked row"
    finally:
        holder.rollback()  # the server ends that session at last
        holder.close()
    thread.join(timeout=30)
    assert claimed == [waiting]
    with sessions.begin() as session:  # the lost one is settled once its row is free
        assert leases.expire_lost_jobs(session, now=start + timedelta(1)) == 1
        assert session.get_one(Job, lost).status == JobStatus.QUEUED
    engine.dispose()


def _shown(url: str, setting: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text(f"SHOW {setting}")).scalar_one())
    finally:
        engine.dispose()


def test_every_postgresql_connection_dies_with_its_peer(own_postgres: OwnPostgres) -> None:
    """A session left idle in a transaction ends on the server after a minute, its locks
    with it; the client probes an idle connection and gives up on unacknowledged data. Without
    them a stale pooled connection, and the wake-ups' LISTEN, waited for the system's TCP
    timeouts (15 min; 2 h idle), and a vanished worker's locks stayed as long."""
    assert _shown(own_postgres.url, "idle_in_transaction_session_timeout") == "1min"
    with_options = make_url(own_postgres.url).update_query_dict(
        {"options": "-c statement_timeout=5s"}
    )
    url = with_options.render_as_string(hide_password=False)
    assert _shown(url, "statement_timeout") == "5s"  # the URL's own options are kept...
    assert _shown(url, "idle_in_transaction_session_timeout") == "1min"  # ...and ours added
    own = make_url(own_postgres.url).update_query_dict(
        {"options": "-c idle_in_transaction_session_timeout=7s", "keepalives_idle": "3"}
    )
    args = engines.postgres_connect_args(own.query)
    assert "keepalives_idle" not in args  # the URL's win
    assert args["options"] == "-c idle_in_transaction_session_timeout=7s -c tcp_user_timeout=30000"
    listener = engines.postgres_connect_args(conninfo_to_dict("host=db dbname=x"))
    assert listener["keepalives"] == 1 and listener["tcp_user_timeout"] > 0
    assert listener["options"] == f"{engines.IDLE_TRANSACTION_OPTION} -c tcp_user_timeout=30000"
