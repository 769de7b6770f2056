"""Lost leases on PostgreSQL when a worker vanishes mid-transaction: its rows stay locked until
the server ends its session, and nothing else may wait on them meanwhile."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.clock import utcnow
from service.schemas import JobCreate
from service.status import JobStatus
from service.store import engines, job_repo, queue_repo
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import Job
from service.store.upkeep import leases
from tests.conftest import OwnPostgres


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
    assert "options" not in args and "keepalives_idle" not in args  # the URL's win
    listener = engines.postgres_connect_args(conninfo_to_dict("host=db dbname=x"))
    assert listener["keepalives"] == 1 and listener["tcp_user_timeout"] > 0
    assert listener["options"] == engines.IDLE_TRANSACTION_OPTION
