"""Which errors are an outage, how long retries wait, and that an outage is logged twice."""

from __future__ import annotations

import logging
import sqlite3
import threading

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from service.errors import LeaseLost
from service.store.outage import BACKOFF_CAP_S, Backoff, Outage, is_outage, retry


def wrapped(orig: Exception, cls: type[sa_exc.DBAPIError] = sa_exc.OperationalError) -> Exception:
    """``orig`` as SQLAlchemy raises it."""
    return cls("UPDATE jobs …", None, orig)


@pytest.mark.parametrize(
    "error",
    [
        wrapped(psycopg.OperationalError("connection failed: … is not accepting connections")),
        wrapped(psycopg.errors.AdminShutdown("terminating connection")),
        wrapped(psycopg.InterfaceError("the connection is closed"), sa_exc.InterfaceError),
        wrapped(sqlite3.OperationalError("unable to open database file")),
        wrapped(sqlite3.OperationalError("attempt to write a readonly database")),
        wrapped(sqlite3.OperationalError("disk I/O error")),
        wrapped(sqlite3.OperationalError("database or disk is full")),
        sa_exc.DisconnectionError("the pool's ping failed"),
    ],
    ids=str,
)
def test_connection_failures_are_an_outage(error: Exception) -> None:
    assert is_outage(error)


@pytest.mark.parametrize(
    "error",
    [
        wrapped(sqlite3.OperationalError("no such table: jobs")),  # a schema never migrated
        wrapped(sqlite3.IntegrityError("UNIQUE constraint failed"), sa_exc.IntegrityError),
        wrapped(psycopg.errors.UndefinedTable("relation jobs does not exist"), sa_exc.DBAPIError),
        LeaseLost("job x attempt 1 is no longer this worker's"),
        ValueError("a bug"),
    ],
    ids=str,
)
def test_other_errors_are_not(error: Exception) -> None:
    assert not is_outage(error)


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "database" in r.getMessage()]


def test_retry_rides_out_an_outage_with_one_line_at_each_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    outage = Outage(logging.getLogger("test.outage"), clock=clock)
    failures = iter([wrapped(sqlite3.OperationalError("disk I/O error"))] * 6)

    def write() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "written"

    with caplog.at_level(logging.WARNING):
        result = retry(
            write, outage=outage, what="flush", wait=clock.wait, backoff=Backoff(rng=lambda: 1.0)
        )
    assert result == "written"
    assert clock.waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    lines = outage_lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("database unreachable (flush: OperationalError: disk I/O error)")
    assert lines[1] == "database is back after 6.3 s"
    assert not outage.down


def test_other_errors_are_raised_at_once_without_waiting() -> None:
    clock = FakeClock()
    outage = Outage(logging.getLogger("test.outage"), clock=clock)

    def lost() -> None:
        raise LeaseLost("job x attempt 1 is no longer this worker's")

    with pytest.raises(LeaseLost):
        retry(lost, outage=outage, what="flush", wait=clock.wait)
    assert clock.waits == [] and not outage.down


def test_give_up_lets_the_outage_error_through() -> None:
    clock = FakeClock()
    outage = Outage(logging.getLogger("test.outage"), clock=clock)

    def down() -> None:
        raise wrapped(psycopg.OperationalError("connection refused"))

    with pytest.raises(sa_exc.OperationalError):
        retry(
            down,
            outage=outage,
            what="claim",
            wait=clock.wait,
            give_up=lambda: len(clock.waits) >= 3,
        )
    assert len(clock.waits) == 3 and outage.down


def test_threads_sharing_an_outage_log_it_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
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
