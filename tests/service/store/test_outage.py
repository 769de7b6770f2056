"""Which errors are an outage, how long retries wait, and that an outage is logged twice."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from service.errors import LeaseLost
from service.store.outage import (
    BACKOFF_CAP_S,
    Backoff,
    Outage,
    is_outage,
    is_storage_full,
    retry,
)
from tests.support import FakeClock


def wrapped(error: Exception) -> sa_exc.DBAPIError:
    """The driver's ``error`` as SQLAlchemy raises it (its OperationalError, IntegrityError...)."""
    made = sa_exc.DBAPIError.instance("UPDATE jobs …", {}, error, type(error))
    assert isinstance(made, sa_exc.DBAPIError)
    return made


def sqlite_error(statement: str, path: str) -> sqlite3.Error:
    """The error SQLite itself raises for ``statement`` on the database at ``path``."""
    try:
        connection = sqlite3.connect(path, uri=path.startswith("file:"))
        try:
            connection.executescript(statement)
        finally:
            connection.close()
    except sqlite3.Error as error:
        return error
    raise AssertionError(f"{statement} succeeded on {path}")


def sqlite_coded(message: str, code: int) -> sqlite3.OperationalError:
    """An error SQLite raises only on a failing disk, with the result code it carries."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return error


def locked(tmp_path: Path) -> sqlite3.Error:
    """SQLite's own "database is locked": another connection holds the write lock."""
    path = str(tmp_path / "locked.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        return sqlite_error("PRAGMA busy_timeout = 0; BEGIN IMMEDIATE", path)
    finally:
        holder.close()


def good_db(tmp_path: Path) -> str:
    path = tmp_path / "good.db"
    sqlite3.connect(path).close()
    return str(path)


def read_only(path: str) -> str:
    return f"file:{path}?mode=ro"


def junk_db(tmp_path: Path) -> str:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database" * 400)
    return str(path)


Make = Callable[[Path], BaseException]
OUTAGES: dict[str, Make] = {
    # SQLite: the file, its lock or its disk (real errors where a test can cause them)
    "sqlite unable to open (a folder)": lambda tmp: sqlite_error("SELECT 1", str(tmp)),
    "sqlite readonly": lambda tmp: sqlite_error("CREATE TABLE t (x)", read_only(good_db(tmp))),
    "sqlite not a database": lambda tmp: sqlite_error("SELECT * FROM sqlite_master", junk_db(tmp)),
    "sqlite locked past busy_timeout": locked,
    "sqlite disk I/O error (IOERR_READ)": lambda _: sqlite_coded("disk I/O error", 266),
    "sqlite disk full": lambda _: sqlite_coded("database or disk is full", 13),
    "sqlite locking protocol": lambda _: sqlite_coded("locking protocol", 15),
    # PostgreSQL: the client library's own connection errors, and SQLSTATEs 08/53/57P/58/25006
    "pg refused": lambda _: psycopg.OperationalError("connection failed: Connection refused"),
    "pg not accepting": lambda _: psycopg.OperationalError(
        "connection failed: … is not accepting connections"
    ),
    "pg connection closed": lambda _: psycopg.InterfaceError("the connection is closed"),
    "pg admin shutdown": lambda _: psycopg.errors.AdminShutdown("terminating connection"),
    "pg starting up": lambda _: psycopg.errors.CannotConnectNow("the system is starting up"),
    "pg read-only": lambda _: psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE"),
    "pg disk full": lambda _: psycopg.errors.DiskFull("could not extend file"),
    # ...and 57014, 55P03: the service sets neither statement_timeout nor (but in the API's
    # connections, where it answers 503) lock_timeout, so these come from the database's own
    # settings or another session's locks, not from a statement of ours
    "pg statement timeout": lambda _: psycopg.errors.QueryCanceled("canceling statement"),
    "pg lock timeout": lambda _: psycopg.errors.LockNotAvailable("canceling statement"),
    # SQLAlchemy: the pool could not hand out a live connection, or one broke
    "sa disconnection": lambda _: sa_exc.DisconnectionError("the pool's ping failed"),
    "sa pool timeout": lambda _: sa_exc.TimeoutError("QueuePool limit reached"),
    "sa connection invalidated": lambda _: sa_exc.DBAPIError.instance(
        "SELECT 1", {}, ValueError("gone"), Exception, connection_invalidated=True
    ),
}
NOT_OUTAGES: dict[str, Make] = {
    # errors in a statement stay bugs (a 500), or real answers
    "sqlite no such table": lambda tmp: sqlite_error("SELECT * FROM no_such_table", good_db(tmp)),
    "sqlite syntax error": lambda tmp: sqlite_error("SELEC 1", good_db(tmp)),
    "sqlite unique": lambda tmp: sqlite_error(
        "CREATE TABLE t (x UNIQUE); INSERT INTO t VALUES (1); INSERT INTO t VALUES (1)",
        good_db(tmp),
    ),
    "pg undefined table": lambda _: psycopg.errors.UndefinedTable('relation "jobs" does not exist'),
    "pg out of range": lambda _: psycopg.errors.NumericValueOutOfRange("integer out of range"),
    "pg unique": lambda _: psycopg.errors.UniqueViolation("duplicate key"),
    "lease lost": lambda _: LeaseLost("job x attempt 1 is no longer this worker's"),
    "a bug": lambda _: ValueError("a bug"),
}


@pytest.mark.parametrize(
    ("make", "outage"),
    [pytest.param(make, True, id=name) for name, make in OUTAGES.items()]
    + [pytest.param(make, False, id=name) for name, make in NOT_OUTAGES.items()],
)
def test_only_connection_and_storage_errors_are_an_outage(
    make: Make, outage: bool, tmp_path: Path
) -> None:
    error = make(tmp_path)
    assert is_outage(error) is outage, error
    if isinstance(error, sqlite3.Error | psycopg.Error):  # the driver's, and as SQLAlchemy's
        assert is_outage(wrapped(error)) is outage, error


FULL = {"sqlite disk full", "pg disk full"}


@pytest.mark.parametrize("name", list(OUTAGES))
def test_of_the_outages_only_a_full_disk_is_storage_full(name: str, tmp_path: Path) -> None:
    error = OUTAGES[name](tmp_path)
    assert is_storage_full(error) is (name in FULL), error
    if isinstance(error, sqlite3.Error | psycopg.Error):
        assert is_storage_full(wrapped(error)) is (name in FULL), error


def test_a_sqlite_error_without_its_result_code_is_not_an_outage() -> None:
    # The result code decides, not the message: every error the sqlite3 module raises has one.
    assert not is_outage(wrapped(sqlite3.OperationalError("disk I/O error")))


def test_backoff_doubles_up_to_its_cap_with_jitter_within_half_a_step() -> None:
    highest = Backoff(rng=lambda: 0.999999)
    lowest = Backoff(rng=lambda: 0.0)
    high = [highest.next_delay() for _ in range(12)]
    low = [lowest.next_delay() for _ in range(12)]
    assert high[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8], rel=1e-5)
    assert low[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert max(high) == pytest.approx(BACKOFF_CAP_S, rel=1e-5) and high[-1] <= BACKOFF_CAP_S
    assert low[-1] == BACKOFF_CAP_S / 2  # never a hot loop, never past the cap
    highest.reset()
    assert highest.next_delay() == pytest.approx(0.1, rel=1e-5)


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "database" in r.getMessage()]


def test_retry_rides_out_an_outage_with_one_line_at_each_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(100.0)
    outage = Outage(logging.getLogger("test.outage"), clock=clock)
    failures = iter([wrapped(sqlite_coded("disk I/O error", 10))] * 6)

    def write() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "written"

    with caplog.at_level(logging.WARNING):
        result = retry(
            write, outage=outage, what="flush", wait=clock.sleep, backoff=Backoff(rng=lambda: 1.0)
        )
    assert result == "written"
    assert clock.pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    lines = outage_lines(caplog)
    assert len(lines) == 2
    assert lines[0] == (
        "database unreachable (flush: OperationalError: disk I/O error); "
        "retrying with backoff until it is back"
    )
    assert lines[1] == "database is back after 6.3 s"
    assert not outage.down


def test_other_errors_are_raised_at_once_without_waiting() -> None:
    clock = FakeClock(100.0)
    outage = Outage(logging.getLogger("test.outage"), clock=clock)

    def lost() -> None:
        raise LeaseLost("job x attempt 1 is no longer this worker's")

    with pytest.raises(LeaseLost):
        retry(lost, outage=outage, what="flush", wait=clock.sleep)
    assert clock.pauses == [] and not outage.down


def test_give_up_lets_the_outage_error_through() -> None:
    clock = FakeClock(100.0)
    outage = Outage(logging.getLogger("test.outage"), clock=clock)

    def down() -> None:
        raise wrapped(psycopg.OperationalError("connection refused"))

    with pytest.raises(sa_exc.OperationalError):
        retry(
            down,
            outage=outage,
            what="claim",
            wait=clock.sleep,
            give_up=lambda: len(clock.pauses) >= 3,
        )
    assert len(clock.pauses) == 3 and outage.down


def test_threads_sharing_an_outage_log_it_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(100.0)
    outage = Outage(logging.getLogger("test.outage"), clock=clock)
    error = wrapped(psycopg.OperationalError("connection refused"))
    start = threading.Barrier(8)

    def fail() -> None:
        start.wait()
        for _ in range(50):
            outage.failed(error, "heartbeat")

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=fail) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        clock.now += 2.0
        for _ in range(5):
            outage.ok()
    assert [line.split(" (")[0] for line in outage_lines(caplog)] == [
        "database unreachable",
        "database is back after 2.0 s",
    ]


def test_a_flapping_database_logs_a_pair_of_lines_a_window_and_counts_the_blips(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Calls that fail and succeed by turns (a pool's live connections beside refused new
    ones) logged a start and an end line every few seconds: 30 lines in a minute here."""
    clock = FakeClock(0.0)
    outage = Outage(logging.getLogger("test.outage"), clock=clock)
    error = wrapped(psycopg.OperationalError("sorry, too many clients already"))
    with caplog.at_level(logging.WARNING):
        for k in range(15):  # down for 0.1 s every 4 s, for a minute
            clock.now = 4.0 * k
            outage.failed(error, "flush")
            clock.now += 0.1
            outage.ok()
    assert [line.split(" (")[0] for line in outage_lines(caplog)] == [
        "database unreachable",
        "database is back after 0.1 s",
        "database unreachable",  # at 32 s: the window after the end line at 0.1 s is over
        "database is back after 0.1 s",
    ]
    assert "(and 7 shorter failures since the last line)" in outage_lines(caplog)[2]


def test_a_failure_within_the_window_is_logged_once_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0.0)
    outage = Outage(logging.getLogger("test.outage"), clock=clock)
    error = wrapped(psycopg.OperationalError("connection refused"))
    with caplog.at_level(logging.WARNING):
        outage.failed(error, "claim")
        clock.now = 1.0
        outage.ok()
        for clock.now in (5.0, 7.0, 9.9):  # a new outage: a blip so far
            outage.failed(error, "claim")
        assert len(outage_lines(caplog)) == 2 and outage.down
        clock.now = 10.0  # it has lasted BLIP_S
        outage.failed(error, "claim")
        clock.now = 12.0
        outage.ok()
    assert [line.split(" (")[0] for line in outage_lines(caplog)] == [
        "database unreachable",
        "database is back after 1.0 s",
        "database unreachable",
        "database is back after 7.0 s",
    ]
