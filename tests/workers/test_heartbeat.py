"""The heartbeat thread: through a database outage (retried with backoff, logged twice), and
for every job of a pack."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.store import worker_repo
from service.store.outage import Outage
from service.store.tables import Job, WorkerRow
from tests.support import wait_for
from tests.workers.flaky import FlakyDatabase
from tests.workers.reports import claimed_reporter
from workers.heartbeat import Heartbeat
from workers.reporting import Limits


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


def test_a_beat_renews_the_lease_of_every_job_of_a_pack_alone(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions.begin() as session:
        worker_repo.register_worker(
            session, worker_id="w", host="h", pid=1, device="cpu", now=utcnow()
        )
    limits = Limits(lease_s=30, flush_interval_s=3600)
    params = {"epochs": 1, "trainset_size": 64}
    pack = [
        claimed_reporter(sessions, params, writes=sessions, checkpoint_dir=tmp_path, limits=limits)
        for _ in range(3)
    ]
    with sessions.begin() as session:  # the second job's lease was taken over by another worker
        taken = session.get(Job, pack[1][1])
        assert taken is not None
        taken.attempt += 1
    heartbeat = Heartbeat(sessions, worker_id="w", heartbeat_s=0.01, lease_s=600)
    heartbeat.reporters = tuple(reporter for reporter, _ in pack)
    for reporter, _ in pack:
        reporter.last_renewal -= 1.0  # no flush renewed it lately
    heartbeat.beat()
    with sessions() as session:
        leases = [session.get(Job, job_id) for _, job_id in pack]
    expiries = [job.lease_expires_at for job in leases if job is not None]
    now = utcnow()
    assert [e is not None and (e - now).total_seconds() > 300 for e in expiries] == [
        True,
        False,  # fenced off: left as it was
        True,
    ]
