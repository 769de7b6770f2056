"""The one rule for "the database is unavailable", and the one log of an outage.

An outage (PostgreSQL down, restarting, refusing or dropping connections, or read-only; a
SQLite file that cannot be opened, read or written, a full disk) is not a bug: workers retry
it with capped exponential backoff and jitter for as long as it lasts (:func:`retry`), and the
API answers it with 503 and ``Retry-After`` (:mod:`service.store.availability`). Only errors at
the level of the connection or the storage count; an error in a statement (a missing table, a
syntax error, a constraint, a lost lease) is a bug or a real answer and is raised at once.

One :class:`Outage` is shared by a process's threads so that an outage is logged once when it
starts and once when it ends, not once per retry or refused request. A few lines of our own
rather than ``tenacity``: the retries must share that outage state and an injectable clock
and wait.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from sqlalchemy import exc as sa_exc

from service.backoff import capped_exponential

T = TypeVar("T")

BACKOFF_BASE_S = 0.1  # the first retry's delay...
BACKOFF_CAP_S = 5.0  # ...doubling up to this
# A full disk: an outage of its own kind (is_storage_full).
SQLITE_FULL = 13
POSTGRES_DISK_FULL = "53100"
BACKOFF_JITTER = 0.5  # each delay is between half and all of its step
# SQLite's primary result codes that say the file, its lock or its disk failed, not the statement.
SQLITE_OUTAGE_CODES = frozenset(
    {
        3,  # SQLITE_PERM: access permission denied
        5,  # SQLITE_BUSY: the write lock stayed taken past busy_timeout
        8,  # SQLITE_READONLY: attempt to write a readonly database
        10,  # SQLITE_IOERR: disk I/O error
        SQLITE_FULL,  # the disk is full (answered 507, see is_storage_full)
        14,  # SQLITE_CANTOPEN: unable to open database file
        15,  # SQLITE_PROTOCOL: the WAL's locking protocol failed (contention): try again
        26,  # SQLITE_NOTADB: the file is not (or no longer) a database
    }
)
# PostgreSQL SQLSTATE classes and codes of the same kind: connection exception (08),
# insufficient resources (53: disk full, too many connections), operator intervention
# (57P: shut down, terminated, starting up; 57014: a statement cancelled, by an operator or a
# statement_timeout the database was given), system error (58: I/O), a read-only transaction
# (25006: a replica, or default_transaction_read_only), and a lock not had in time (55P03:
# lock_timeout, behind another session's lock on a table). A statement_timeout of 1 ms failed
# every job, and a worker whose job's end was cancelled exited.
POSTGRES_READ_ONLY = "25006"
POSTGRES_OUTAGE_SQLSTATES = ("08", "53", "57P", "57014", "58", POSTGRES_READ_ONLY, "55P03")


def _driver_outage(error: BaseException | None) -> bool:
    if isinstance(error, sqlite3.Error):
        # Set on every error the sqlite3 module raises (Python 3.11+); the message is not
        # a contract, the result code is.
        code = getattr(error, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in SQLITE_OUTAGE_CODES
    if isinstance(error, psycopg.Error):
        if error.sqlstate is None:
            # Raised by the client library itself: the connection failed, broke or is closed.
            return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
        return error.sqlstate.startswith(POSTGRES_OUTAGE_SQLSTATES)
    return False


def _driver_storage_full(error: BaseException | None) -> bool:
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == SQLITE_FULL
    if isinstance(error, psycopg.Error):
        return error.sqlstate == POSTGRES_DISK_FULL
    return False


def is_storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the outage of a full disk (SQLite's FULL, PostgreSQL's
    ``disk_full``): the API answers it 507 ``storage_full`` rather than 503, as it lasts until
    space is freed. Still an outage (:func:`is_outage`): workers retry it like any other."""
    if isinstance(exc, sa_exc.DBAPIError):
        return _driver_storage_full(exc.orig)
    return _driver_storage_full(exc)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (SQLAlchemy's or a driver's own) says the database cannot be reached,
    read or written now: worth retrying, or answering 503.

    Schema errors, constraint violations and :class:`~service.errors.LeaseLost` are not.
    """
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # the pool could not hand out a live connection
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or _driver_outage(exc.orig)
    return _driver_outage(exc)


@dataclass
class Backoff:
    """Capped exponential delays (:func:`~service.backoff.capped_exponential`) with jitter:
    each is between half and all of its step."""

    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S
    rng: Callable[[], float] = random.random
    failures: int = field(default=0, init=False)

    def next_delay(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        delay = capped_exponential(
            self.base_s, self.cap_s, self.failures, jitter=BACKOFF_JITTER, rng=self.rng
        )
        self.failures += 1
        return delay

    def reset(self) -> None:
        """The last try worked: the next failure starts from the first delay again."""
        self.failures = 0


# A database that fails some calls and answers others (a full disk under reads, a server out
# of connections beside a pool's live ones) would log a start and an end line every few
# seconds. Within this long of an end line, a failure is logged only once it has lasted
# BLIP_S; shorter ones are counted and told with the next line.
FLAPPING_WINDOW_S = 30.0
BLIP_S = 5.0


class Outage:
    """Whether the database is unreachable now, as a process's threads have found it.

    Logs one line when the first failure is seen (what failed, why, and ``while_down``: what
    the process does meanwhile) and one, with the duration, when a call succeeds again; while
    it flaps, a line per :data:`FLAPPING_WINDOW_S` at most, with the blips counted.
    """

    def __init__(
        self,
        log: logging.Logger,
        *,
        while_down: str = "retrying with backoff",
        clock: Callable[[], float] = time.monotonic,
    ):
        self._log = log
        self._while_down = while_down
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._told = False  # whether this outage's start was logged
        self._last_end_told: float | None = None
        self._blips = 0  # short failures not logged since the last line

    @property
    def down(self) -> bool:
        """Whether the last call to the database failed with an outage."""
        return self._since is not None

    def failed(self, exc: BaseException, what: str) -> None:
        """A call (``what``) failed with an outage error."""
        if self._since is not None and self._told:  # the common case during an outage: no lock
            return
        with self._lock:  # logged under the lock: a start line never follows its end line
            now = self._clock()
            if self._since is None:
                self._since = now
                ended = self._last_end_told
                self._told = ended is None or now - ended >= FLAPPING_WINDOW_S
            elif not self._told and now - self._since >= BLIP_S:
                self._told = True  # no blip: it lasts
            else:
                return
            if not self._told:
                return
            # The detail (a server address, a file name) is for the log, which is the operator's.
            self._log.warning(
                "database unreachable (%s: %s); %s until it is back%s",
                what,
                first_line(exc),
                self._while_down,
                self._take_blips(),
            )

    def ok(self) -> None:
        """A call to the database succeeded."""
        if self._since is None:  # the common case: no lock
            return
        with self._lock:
            if self._since is None:
                return
            since, self._since = self._since, None
            if not self._told:
                self._blips += 1
                return
            now = self._clock()
            self._last_end_told = now
            self._log.warning("database is back after %.1f s%s", now - since, self._take_blips())

    def _take_blips(self) -> str:
        blips, self._blips = self._blips, 0
        return f" (and {blips} shorter failures since the last line)" if blips else ""


def first_line(exc: BaseException) -> str:
    """The error's type and the first line of its text: libpq's run to three lines."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"


def retry(
    op: Callable[[], T],
    *,
    outage: Outage,
    what: str,
    wait: Callable[[float], object] = time.sleep,
    give_up: Callable[[], bool] | None = None,
    backoff: Backoff | None = None,
) -> T:
    """``op()``, tried again after each outage error until it succeeds.

    Other errors propagate at once. ``give_up`` is asked after each failure: when it says
    yes, the outage error propagates (a worker told to stop does not wait forever).
    """
    backoff = backoff or Backoff()
    while True:
        try:
            result = op()
        except Exception as exc:
            if not is_outage(exc):
                raise
            outage.failed(exc, what)
            if give_up is not None and give_up():
                raise
            wait(backoff.next_delay())
            if give_up is not None and give_up():
                raise
            continue
        outage.ok()
        return result
