"""Workers' rows: liveness on the database's clock, whatever the workers' clocks say."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.store import worker_repo
from service.store.tables import WorkerRow
from service.store.upkeep.db_clock import database_time
from tests.records import LEASE_S


def live(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return [row.id for row, _ in worker_repo.live_workers(session, lease_s=LEASE_S)]


def test_a_worker_is_live_by_the_database_clock_not_by_its_own(
    sessions: sessionmaker[Session],
) -> None:
    """A worker whose clock was a lease behind the API's was never seen alive (/workers,
    readiness with MNIST_READY_REQUIRES_WORKER, the live-workers gauge); one ahead was seen
    alive a lease after it died."""
    behind = utcnow() - timedelta(hours=1)
    with sessions.begin() as session:
        for worker_id in ("behind", "silent"):
            worker_repo.register_worker(
                session, worker_id=worker_id, host="h", pid=1, device="cpu", now=behind
            )
    assert sorted(live(sessions)) == ["behind", "silent"]
    with sessions.begin() as session:  # "silent" last heard from a lease ago
        stale = database_time(-LEASE_S - 1)
        session.execute(
            update(WorkerRow).where(WorkerRow.id == "silent").values(heartbeat_at=stale)
        )
    assert live(sessions) == ["behind"]
    with sessions.begin() as session:
        worker_repo.worker_heartbeat(session, worker_id="silent")
    assert sorted(live(sessions)) == ["behind", "silent"]
    with sessions() as session:  # its own start time is kept as it told it
        assert session.get_one(WorkerRow, "behind").started_at == behind
