"""The heartbeat thread through a database outage: retried with backoff, logged twice."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.store import worker_repo
from service.store.outage import Outage
from service.store.tables import WorkerRow
from tests.support import wait_for
from tests.workers.flaky import FlakyDatabase
from workers.heartbeat import Heartbeat


def beat_at(sessions: sessionmaker[Session]) -> object:
    with sessions() as session:
        row = session.get(WorkerRow, "w")
        assert row is not None
        return row.heartbeat_at


def test_beats_are_retried_through_an_outage_and_resume_after_it(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    with sessions.begin() as session:
        worker_repo.register_worker(
            session, worker_id="w", host="h", pid=1, device="cpu", now=utcnow()
        )
    db = FlakyDatabase(sessions)
    outage = Outage(logging.getLogger("workers"))
    heartbeat = Heartbeat(
        db.sessionmaker(), worker_id="w", heartbeat_s=2.0, lease_s=30, outage=outage
    )
    db.down = True
    with caplog.at_level(logging.WARNING, logger="workers"):
        heartbeat.start()
        try:
            # Backoff starts at 0.1 s: three tries come well before a second beat would.
            wait_for(lambda: db.tries >= 3, timeout_s=3.9, what="beats retried within a beat")
            assert outage.down
            before = beat_at(sessions)
            db.down = False
            wait_for(lambda: not outage.down, timeout_s=10, what="a beat after the outage")
            assert beat_at(sessions) != before
        finally:
            heartbeat.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0].split(" after")[0] for m in messages] == [
        "database unreachable",
        "database is back",
    ]
