"""The API's side of an outage: 503 for an outage and the bug for a bug, the write probe, and
the API's one outage log. Which errors are an outage: tests/service/store/test_outage.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import event, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import DatabaseUnavailable
from service.store import availability
from service.store.availability import API_OUTAGE, unavailable_as_503
from service.store.engines import make_engine, make_sessionmaker
from service.store.outage import Outage, is_outage
from service.store.tables import ReadinessProbe
from tests.service.store.test_outage import sqlite_error, wrapped


@pytest.fixture(autouse=True)
def api_outage_over() -> Iterator[None]:
    """The process-wide outage state is left as it was found: up; and each test starts with
    no outage logged before it (a failure soon after one that ended is logged once it lasts)."""
    API_OUTAGE.ok()
    fresh = Outage(API_OUTAGE._log, while_down="answering 503 with Retry-After")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(API_OUTAGE, "__dict__", fresh.__dict__)
        yield
    API_OUTAGE.ok()


def test_an_outage_becomes_a_503_and_a_bug_stays_itself(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable) as raised, unavailable_as_503("an event stream"):
        raise wrapped(sqlite_error("SELECT 1", str(tmp_path)))
    assert raised.value.status_code == 503 and raised.value.headers["Retry-After"] == "2"
    assert API_OUTAGE.down
    API_OUTAGE.ok()
    with pytest.raises(sa_exc.DBAPIError), unavailable_as_503("an event stream"):
        raise wrapped(sqlite_error("SELEC 1", str(tmp_path / "x.db")))


def test_the_write_probe_commits_and_fails_on_a_read_only_database(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        for _ in range(2):  # the first writes the row, the second updates it
            now = utcnow()
            with sessions() as session:
                availability.probe_write(session, now)
            with sessions() as session:
                assert session.scalars(select(ReadinessProbe.written_at)).all() == [now]
        readonly = read_only_sessions(engine.url.render_as_string(hide_password=False))
        with pytest.raises(sa_exc.DBAPIError) as raised, readonly() as session:
            availability.probe_write(session, utcnow())
        assert is_outage(raised.value)
        readonly.kw["bind"].dispose()
    finally:
        engine.dispose()


def read_only_sessions(url: str) -> sessionmaker[Session]:
    """Sessions on a connection that refuses writes, as a read-only file or replica does."""
    engine = make_engine(url)
    statement = (
        "PRAGMA query_only = ON"
        if engine.dialect.name == "sqlite"
        else "SET default_transaction_read_only = on"
    )

    def read_only(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute(statement)
        cursor.close()
        if engine.dialect.name != "sqlite":
            dbapi_connection.commit()  # type: ignore[attr-defined]

    event.listen(engine, "connect", read_only)
    return make_sessionmaker(engine)


def test_the_api_logs_an_outage_once_as_it_starts_and_once_as_it_ends(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    refused = wrapped(psycopg.OperationalError("connection failed: Connection refused"))
    with caplog.at_level(logging.INFO, logger="service.database"):
        API_OUTAGE.ok()  # nothing to end
        for _ in range(50):  # refused requests, streams and model lookups: one line
            with pytest.raises(DatabaseUnavailable), unavailable_as_503("a model lookup"):
                raise refused
        API_OUTAGE.failed(refused, "readiness")
        API_OUTAGE.ok()
        API_OUTAGE.ok()
    messages = [r.getMessage() for r in caplog.records if r.name == "service.database"]
    assert len(messages) == 2, messages
    assert messages[0] == (
        "database unreachable (a model lookup: OperationalError: connection failed: "
        "Connection refused); answering 503 with Retry-After until it is back"
    )
    assert messages[1].startswith("database is back after ") and messages[1].endswith(" s")
    assert not API_OUTAGE.down
