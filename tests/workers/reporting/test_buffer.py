"""A training worker's steps while the database is down: kept, bounded, written once (both DBs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import LeaseLost
from service.store import metric_repo, queue_repo
from service.store.tables import Job
from service.store.upkeep.db_clock import database_time
from tests.jobs import read_job
from tests.support import SMALL_TEST, SMALL_TRAIN
from tests.workers.flaky import FlakyDatabase
from tests.workers.reports import claimed_reporter
from workers.reporting import Limits, Reporter

PARAMS = {"epochs": 2, "batch_size": 64, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}


def make_reporter(
    sessions: sessionmaker[Session], db: FlakyDatabase, tmp_path: Path, **kwargs: Any
) -> tuple[Reporter, str]:
    limits = Limits(lease_s=30, flush_interval_s=3600)
    return claimed_reporter(
        sessions, PARAMS, writes=db.sessionmaker(), checkpoint_dir=tmp_path, limits=limits, **kwargs
    )


def stored_steps(sessions: sessionmaker[Session], job_id: str) -> list[int]:
    with sessions() as session:
        return [
            s["step"] for s in metric_repo.read_steps(session, job_id, after_step=0, limit=10_000)
        ]


def test_steps_taken_while_the_database_is_down_are_written_once_when_it_is_back(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = FlakyDatabase(sessions)
    reporter, job_id = make_reporter(sessions, db, tmp_path)
    for _ in range(3):
        reporter.step(torch.tensor(1.0))
    reporter.flush()
    db.down = True
    with caplog.at_level(logging.WARNING, logger="workers"):
        for _ in range(3):
            for _ in range(4):
                reporter.step(torch.tensor(0.5))
            reporter.flush()  # fails, keeps the steps, and training goes on
        assert read_job(sessions, job_id).step == 3
        db.down = False
        reporter.step(torch.tensor(0.25))
        reporter.flush()
    assert stored_steps(sessions, job_id) == list(range(1, 17))
    assert read_job(sessions, job_id).step == 16
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("database unreachable") for m in messages) == 1
    assert sum(m.startswith("database is back after") for m in messages) == 1


def test_a_write_whose_answer_was_lost_is_not_stored_twice(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    db = FlakyDatabase(sessions)
    reporter, job_id = make_reporter(sessions, db, tmp_path)
    for _ in range(5):
        reporter.step(torch.tensor(1.0))
    db.break_after_commit = True
    reporter.flush()  # committed, but the worker cannot know: the steps stay buffered
    assert stored_steps(sessions, job_id) == [1, 2, 3, 4, 5]
    reporter.step(torch.tensor(1.0))
    reporter.flush()  # writes 1–6 again, replacing 1–5 (no duplicate key)
    assert stored_steps(sessions, job_id) == [1, 2, 3, 4, 5, 6]


def test_a_full_buffer_pauses_training_until_the_database_is_back(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    db = FlakyDatabase(sessions)
    waits: list[float] = []

    def wait(seconds: float) -> None:  # the loop is paused here; the database returns later
        waits.append(seconds)
        db.down = len(waits) < 3

    reporter, job_id = make_reporter(sessions, db, tmp_path, max_buffered_steps=8, wait=wait)
    db.down = True
    for _ in range(7):
        reporter.step(torch.tensor(1.0))
    reporter.flush()
    assert waits == []  # 7 of 8: training goes on
    reporter.step(torch.tensor(1.0))  # the 8th fills the buffer: this call waits, then writes
    assert len(waits) == 3
    assert stored_steps(sessions, job_id) == list(range(1, 9))


def test_a_lease_taken_during_the_outage_stops_the_job_and_writes_nothing(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    db = FlakyDatabase(sessions)
    reporter, job_id = make_reporter(sessions, db, tmp_path)
    db.down = True
    for _ in range(4):
        reporter.step(torch.tensor(1.0))
    reporter.flush()
    # Meanwhile the lease ran out and, once the database was back, another worker claimed it.
    with sessions.begin() as session:
        session.execute(update(Job).values(lease_expires_at=database_time(-1)))
        job = queue_repo.claim_job(session, worker_id="w2", lease_s=30, device="cpu", now=utcnow())
        assert job is not None and job.attempt == 2
    db.down = False
    with pytest.raises(LeaseLost):
        reporter.flush()
    with pytest.raises(LeaseLost):
        reporter.drain()
    assert stored_steps(sessions, job_id) == []


def test_drain_writes_every_buffered_step_and_epoch_before_the_end(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    db = FlakyDatabase(sessions)
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        db.down = False

    reporter, job_id = make_reporter(sessions, db, tmp_path, wait=wait)
    db.down = True
    for _ in range(10):
        reporter.step(torch.tensor(1.0))
    reporter.flush()
    reporter.drain()
    assert waits and stored_steps(sessions, job_id) == list(range(1, 11))
