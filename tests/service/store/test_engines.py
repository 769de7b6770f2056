"""Engines: a PostgreSQL host that never answers is an outage within a bounded time; a read on
SQLite's driver connection is the snapshot a read session's is."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

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
