"""Reads on the driver's cursor give what SQLAlchemy's own results give, on both databases and
through each kind of reader: a job's columns in every state a poll may find it in."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.status import JobStatus
from service.store import job_repo
from service.store.engines import DriverConnection, read_engine, sqlite_read_transaction
from service.store.tables import Job
from tests.records import PARAMS, FakeTraining


def by_sqlalchemy(sessions: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    """The job's columns as SQLAlchemy's results give them (the reference)."""
    with sessions() as session:
        row = session.execute(select(Job.__table__).where(Job.__table__.c.id == job_id)).first()
        assert row is not None
        return dict(row._mapping)


def by_each_reader(engine: Engine, sessions: sessionmaker[Session], job_id: str) -> list[Any]:
    """The job's columns read by a Session, a Connection and (SQLite) the driver's connection."""
    found: list[Any] = []
    with sessions() as session:
        found.append(job_repo.job_row(session, job_id))
    with read_engine(engine).connect() as connection, connection.begin():
        found.append(job_repo.job_row(connection, job_id))
    if engine.dialect.name == "sqlite":
        pooled = engine.raw_connection()
        try:
            driver = DriverConnection(engine.dialect, pooled.driver_connection)
            with sqlite_read_transaction(driver.dbapi_connection):
                found.append(job_repo.job_row(driver, job_id))
        finally:
            pooled.close()
    return found


def same_as_sqlalchemy(engine: Engine, sessions: sessionmaker[Session], job_id: str) -> None:
    expected = by_sqlalchemy(sessions, job_id)
    for row in by_each_reader(engine, sessions, job_id):
        assert row is not None and vars(row) == expected
        assert type(row.status) is JobStatus


def test_a_jobs_columns_read_on_the_driver_are_sqlalchemys(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    training = FakeTraining(sessions, PARAMS)
    job_id = training.submit()
    same_as_sqlalchemy(engine, sessions, job_id)  # queued: no start, no worker
    training.claim()
    training.advance(3, end_epoch=0.5)
    running = by_sqlalchemy(sessions, job_id)
    assert running["status"] == JobStatus.RUNNING and running["started_at"].tzinfo is not None
    same_as_sqlalchemy(engine, sessions, job_id)  # datetimes, an accuracy, a worker
    assert all(row is None for row in by_each_reader(engine, sessions, "0" * 32))
