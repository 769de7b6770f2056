"""Engines: a PostgreSQL host that never answers is an outage within a bounded time; a read on
SQLite's driver connection is the snapshot a read session's is."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.store import engines
from service.store.outage import is_outage


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port whose listener takes connections into its backlog and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def _fails_as_an_outage_soon(url: str) -> None:
    engine = engines.make_engine(url)
    began = time.monotonic()
    try:
        with pytest.raises(sa_exc.OperationalError) as raised, engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    # Without a connect timeout this waits for the server forever (it never answers).
    assert time.monotonic() - began < 30
    assert is_outage(raised.value)


def test_a_silent_postgresql_host_fails_as_an_outage_within_the_connect_timeout(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "POSTGRES_CONNECT_TIMEOUT_S", 1)
    _fails_as_an_outage_soon(f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/x")


def test_a_connect_timeout_in_the_url_wins(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "POSTGRES_CONNECT_TIMEOUT_S", 3600)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/x?connect_timeout=1"
    _fails_as_an_outage_soon(url)


@pytest.mark.parametrize(
    ("lease_s", "connect_s", "unacknowledged_ms"),
    [(30.0, 5, 5000), (12.0, 2, 2000), (3.0, 2, 2000), (90.0, 10, 15000), (3600.0, 10, 30000)],
)
def test_a_lease_holders_connections_give_up_a_stall_in_a_sixth_of_the_lease_or_2_s(
    lease_s: float, connect_s: int, unacknowledged_ms: int
) -> None:
    assert engines.stall_limits(lease_s) == {
        "connect_timeout": connect_s,
        "tcp_user_timeout": unacknowledged_ms,
    }


def test_a_workers_connections_are_opened_with_its_leases_stall_limits(postgres_url: str) -> None:
    """What the driver was given, read back from the open connection: the worker's engine
    (``lease_s``) gives up sooner than the API's; the URL's own value still wins."""

    def given(url: str, **kwargs: float) -> dict[str, str]:
        engine = engines.make_engine(url, **kwargs)
        try:
            with engine.connect() as connection:
                driver = connection.connection.driver_connection
                assert isinstance(driver, psycopg.Connection)
                return driver.info.get_parameters()
        finally:
            engine.dispose()

    assert given(postgres_url, lease_s=12)["tcp_user_timeout"] == "2000"
    assert given(postgres_url, lease_s=12)["connect_timeout"] == "2"
    # The server's end of the connection too: a client cut off mid-transaction frees its locks.
    engine = engines.make_engine(postgres_url, lease_s=12)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW tcp_user_timeout")).scalar() == "2000"
    finally:
        engine.dispose()
    assert given(postgres_url)["tcp_user_timeout"] == "30000"
    own = make_url(postgres_url).update_query_dict({"tcp_user_timeout": "7000"})
    assert (
        given(own.render_as_string(hide_password=False), lease_s=12)["tcp_user_timeout"] == "7000"
    )


def test_a_driver_read_is_a_snapshot_beside_a_writer_and_ends_with_its_block(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'snap.db'}"
    engine = engines.make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (n INTEGER)"))
            connection.execute(text("INSERT INTO t VALUES (1)"))
        reader = engine.raw_connection()
        driver = reader.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        try:
            with engines.sqlite_read_transaction(driver):
                assert driver.execute("SELECT count(*) FROM t").fetchone() == (1,)
                # A writer (IMMEDIATE) neither waits for the reader nor shows it its rows.
                with engine.begin() as writer:
                    writer.execute(text("INSERT INTO t VALUES (2)"))
                assert driver.execute("SELECT count(*) FROM t").fetchone() == (1,)
            assert not driver.in_transaction
            with engines.sqlite_read_transaction(driver):
                assert driver.execute("SELECT count(*) FROM t").fetchone() == (2,)

            with pytest.raises(sqlite3.OperationalError), engines.sqlite_read_transaction(driver):
                driver.execute("SELECT * FROM no_such_table")
            assert not driver.in_transaction  # rolled back: the next read begins afresh
            with engines.sqlite_read_transaction(driver):
                assert driver.execute("SELECT max(n) FROM t").fetchone() == (2,)
        finally:
            reader.close()
    finally:
        engine.dispose()


def test_a_sqlite_folder_that_cannot_be_made_is_an_outage_until_it_can(tmp_path: Path) -> None:
    """A file where the folder should be (as a permission or a mount still to come would):
    the engine is built, each connection is an outage, and the first after the cause is gone
    makes the folder and opens the database. It used to raise at start, a traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    database = blocker / "data" / "db.sqlite"
    engine = engines.make_engine(f"sqlite:///{database}")
    try:
        for _ in range(2):  # each try makes the folder again, not just the first
            with pytest.raises(sa_exc.OperationalError) as raised, engine.connect():
                pass
            assert is_outage(raised.value)
        blocker.unlink()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
        assert database.exists()
    finally:
        engine.dispose()
