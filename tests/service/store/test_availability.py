"""Which database errors are an outage (503) and which a bug (500); the write probe."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import event, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import DatabaseUnavailable
from service.store import availability
from service.store.availability import OutageLog, is_unavailable, unavailable_as_503
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import ReadinessProbe


def sqlite_error(statement: str, path: str) -> sqlite3.Error:
    """The error SQLite itself raises for ``statement`` on the database at ``path``."""
    try:
        connection = sqlite3.connect(path, uri=path.startswith("file:"))
        try:
            connection.execute(statement)
        finally:
            connection.close()
    except sqlite3.Error as error:
        return error
    raise AssertionError(f"{statement} succeeded on {path}")


def wrapped(error: Exception) -> sa_exc.DBAPIError:
    """The error as SQLAlchemy raises it."""
    made = sa_exc.DBAPIError.instance("SELECT 1", {}, error, type(error))
    assert isinstance(made, sa_exc.DBAPIError)
    return made


def test_sqlite_storage_errors_are_outages_and_statement_errors_are_not(tmp_path: Path) -> None:
    good = tmp_path / "good.db"
    sqlite3.connect(good).close()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 400)
    outages = [
        sqlite_error("SELECT 1", str(tmp_path)),  # a folder: unable to open database file
        sqlite_error("CREATE TABLE t (x)", f"file:{good}?mode=ro"),  # readonly database
        sqlite_error("SELECT * FROM sqlite_master", str(tmp_path / "junk.db")),  # not a database
    ]
    bugs = [
        sqlite_error("SELECT * FROM no_such_table", str(good)),
        sqlite_error("SELEC 1", str(good)),
    ]
    for error in outages:
        assert is_unavailable(error) and is_unavailable(wrapped(error)), error
    for error in bugs:
        assert not is_unavailable(error) and not is_unavailable(wrapped(error)), error


def test_postgres_connection_errors_are_outages_and_statement_errors_are_not() -> None:
    refused = psycopg.OperationalError("connection failed: Connection refused")
    outages = [
        refused,
        psycopg.InterfaceError("the connection is closed"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CannotConnectNow("the database system is starting up"),
        psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE in a read-only transaction"),
        psycopg.errors.DiskFull("could not extend file"),
    ]
    bugs = [
        psycopg.errors.UndefinedTable('relation "nope" does not exist'),
        psycopg.errors.NumericValueOutOfRange("integer out of range"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.UniqueViolation("duplicate key"),
    ]
    for error in outages:
        assert is_unavailable(error) and is_unavailable(wrapped(error)), error
    for error in bugs:
        assert not is_unavailable(error) and not is_unavailable(wrapped(error)), error
    assert is_unavailable(sa_exc.DisconnectionError("gone"))
    assert is_unavailable(sa_exc.TimeoutError("QueuePool limit reached"))
    assert not is_unavailable(ValueError("a bug"))


def test_an_outage_becomes_a_503_and_a_bug_stays_itself(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable) as raised, unavailable_as_503():
        raise wrapped(sqlite_error("SELECT 1", str(tmp_path)))
    assert raised.value.status_code == 503 and raised.value.headers["Retry-After"] == "2"
    with pytest.raises(sa_exc.DBAPIError), unavailable_as_503():
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
        assert is_unavailable(raised.value)
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


def test_an_outage_is_logged_as_it_starts_and_ends(caplog: pytest.LogCaptureFixture) -> None:
    outages = OutageLog(logging.getLogger("test.outages"), repeat_s=3600)
    error = psycopg.OperationalError("connection failed: Connection refused")
    with caplog.at_level(logging.INFO, logger="test.outages"):
        outages.up()  # nothing to end
        for _ in range(50):
            outages.unavailable(error)
        outages.up()
        outages.up()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("database unavailable") and "Connection refused" in messages[0]
    assert (
        messages[1].startswith("database available again")
        and "refusals since the last line: 49" in messages[1]
    )


def test_a_long_outage_is_recalled_now_and_then(caplog: pytest.LogCaptureFixture) -> None:
    outages = OutageLog(logging.getLogger("test.long"), repeat_s=0)
    error = psycopg.OperationalError("connection failed: Connection refused")
    with caplog.at_level(logging.INFO, logger="test.long"):
        outages.unavailable(error)
        outages.unavailable(error)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("database unavailable")
    assert messages[1].startswith("database still unavailable (refusals since the last line: 0")
