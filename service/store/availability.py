"""Whether the database is there: which errors mean "unavailable", and the write probe.

An outage (PostgreSQL down, restarting, refusing connections or read-only; a SQLite file that
cannot be opened, read or written, a full disk) is not a bug: the API answers it with 503 and
``Retry-After`` (:class:`service.errors.DatabaseUnavailable`) and recovers by itself when the
database is back. Only errors at the level of the connection or the storage count; an error
in a statement (a missing table, a syntax error, a constraint) stays a bug, a 500.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.errors import DatabaseUnavailable
from service.store.tables import ReadinessProbe

# SQLite's primary result codes that say the file or its disk failed, not the statement.
SQLITE_UNAVAILABLE = frozenset(
    {
        3,  # SQLITE_PERM: access permission denied
        5,  # SQLITE_BUSY: the write lock stayed taken past busy_timeout
        8,  # SQLITE_READONLY: attempt to write a readonly database
        10,  # SQLITE_IOERR: disk I/O error
        13,  # SQLITE_FULL: the disk is full
        14,  # SQLITE_CANTOPEN: unable to open database file
        26,  # SQLITE_NOTADB: the file is not (or no longer) a database
    }
)
# PostgreSQL SQLSTATE classes and codes of the same kind: connection exception (08),
# insufficient resources (53: disk full, too many connections), operator intervention
# (57P: shut down, terminated, starting up), system error (58: I/O), and a read-only
# transaction (25006: a replica, or default_transaction_read_only).
POSTGRES_UNAVAILABLE_PREFIXES = ("08", "53", "57P", "58", "25006")


def _driver_unavailable(error: BaseException | None) -> bool:
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in SQLITE_UNAVAILABLE
    if isinstance(error, psycopg.Error):
        if error.sqlstate is None:
            # Raised by the client library itself: the connection failed, broke or is closed.
            return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
        return error.sqlstate.startswith(POSTGRES_UNAVAILABLE_PREFIXES)
    return False


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (SQLAlchemy's or a driver's own) means the database is unavailable."""
    if isinstance(error, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # the pool could not hand out a live connection
    if isinstance(error, sa_exc.DBAPIError):
        return error.connection_invalidated or _driver_unavailable(error.orig)
    return _driver_unavailable(error)


@contextmanager
def unavailable_as_503() -> Iterator[None]:
    """Turn an outage raised inside into :class:`DatabaseUnavailable` (for code that answers
    clients outside the routes' exception handlers: the fast lanes, the event stream)."""
    try:
        yield
    except Exception as exc:
        if is_unavailable(exc):
            OUTAGES.unavailable(exc)
            raise DatabaseUnavailable() from exc
        raise


def probe_write(session: Session, now: datetime) -> None:
    """Write one row and commit: raises when the database cannot take a write.

    A committed change is the honest test. A transaction rolled back may never reach the
    disk (SQLite writes nothing for it), so it would pass on a read-only file or a full disk;
    an upsert of the one row of ``readiness_probe`` is written through, on both databases.
    """
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(ReadinessProbe).values(id=1, written_at=now)
    session.execute(
        stmt.on_conflict_do_update(index_elements=[ReadinessProbe.id], set_={"written_at": now})
    )
    session.commit()


class OutageLog:
    """Logs an outage as it starts and as it ends, not once per refused request.

    :meth:`unavailable` logs a warning when the database was last seen up (and again at most
    every ``repeat_s`` while it stays down, with how many refusals went unlogged); :meth:`up`
    logs once when it answers again.
    """

    def __init__(self, log: logging.Logger, *, repeat_s: float = 60.0) -> None:
        self._log = log
        self._repeat_s = repeat_s
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._logged_at = 0.0
        self._unlogged = 0

    def unavailable(self, error: BaseException) -> None:
        """The database failed a request: log it if this starts an outage (or a minute went by)."""
        now = time.monotonic()
        with self._lock:
            starting = self._down_since is None
            if not starting and now - self._logged_at < self._repeat_s:
                self._unlogged += 1
                return
            if starting:
                self._down_since = now
            self._logged_at, unlogged, self._unlogged = now, self._unlogged, 0
        cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if starting:
            self._log.warning("database unavailable, answering 503 until it is back (%s)", cause)
        else:
            self._log.warning(
                "database still unavailable (refusals since the last line: %d; %s)", unlogged, cause
            )

    def up(self) -> None:
        """The database answered: log the end of an outage, if there was one."""
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            lasted, self._down_since = time.monotonic() - self._down_since, None
            refused, self._unlogged = self._unlogged, 0
        self._log.info(
            "database available again after %.1f s (refusals since the last line: %d)",
            lasted,
            refused,
        )


OUTAGES = OutageLog(logging.getLogger("service.database"))
