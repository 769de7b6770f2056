"""Engines and sessions: SQLite tuned for one writer at a time, PostgreSQL as it comes; and
reads straight on the driver's connection.

Driver reads: a statement compiled once per dialect, its rows fetched without SQLAlchemy's
result objects. A poll of a few rows paid more for SQLAlchemy's connection, transaction and
result machinery than for the read itself (docs/benchmarks.md, "Metrics polling"); for a large
page of steps its result rows cost as much again as the driver's fetch. The repositories read
polled data through :func:`driver_rows` and :func:`typed_rows`, whether they are handed a
Session (a route), a Connection (the polls' fast lane in a thread) or a
:class:`DriverConnection` (the lane on SQLite's event loop), so that the lane and the routes
read alike.
"""

from __future__ import annotations

import functools
import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, create_engine, event, text
from sqlalchemy.engine import URL, Connection, Dialect, ExceptionContext, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from service.store.outage import POSTGRES_READ_ONLY

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A connection's info: (device, inode) of the file it opened, and of its -wal file (None where
# either was not there).
SQLITE_FILE = "sqlite_file"
# How long a new PostgreSQL connection may take. Without it a database host that drops packets
# (rather than refusing) holds a request's thread, or a worker's flush, for the system's TCP
# timeout (minutes) before anything can retry; with it, that is an outage like any other.
POSTGRES_CONNECT_TIMEOUT_S = 10
# A connection that was up and went dead: the peer gone without a word (a partition, a NAT's
# flows dropped, a killed host). Without these a pooled connection's next query, and a LISTEN,
# waited for the system's TCP timeouts (15 min with data unacknowledged, 2 h idle), and the
# server kept a vanished worker's transaction, and its row locks, as long.
POSTGRES_LIVENESS: dict[str, Any] = {
    "keepalives": 1,  # probe an idle connection after 10 s, every 5 s, 3 times: dead in 25 s
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms: data unacknowledged this long ends the connection
}
# A worker's connections give up a stalled send, or a connect, within this share of its job's
# lease (no less than libpq's least connect_timeout, no more than the defaults above). TCP
# retries a lost send ever later (0.2 s, then twice as long each time): after a partition of
# half the lease its next try could come after the lease had run out, the job was another
# worker's, and the training since its last write was lost. A fresh connection once the
# network is back renews the lease while it still runs.
LEASE_SHARE_FOR_A_STALL = 1 / 6
LEAST_STALL_S = 2
# On the server: a transaction left idle this long (its client gone) ends, its locks with it
# (added to the URL's own ``options``). The service's transactions wait milliseconds between
# their statements; a vanished worker's held the rows every claim's settling then waited on.
IDLE_TRANSACTION_OPTION = "-c idle_in_transaction_session_timeout=60s"
# How long a request's statement waits for a lock on PostgreSQL (the API's engines): behind
# another session's lock on a table (a DBA's LOCK TABLE, a migration), every route that read
# it waited as long, answering nothing; now it fails as an outage, a 503 with Retry-After.
REQUEST_LOCK_WAIT_S = 5.0
SQLITE_BEGIN_OPTION = "sqlite_begin"
# How reading transactions begin on SQLite: a WAL snapshot that never waits for a writer.
SQLITE_READ_BEGIN = "DEFERRED"


def sqlite_file(url: str | URL) -> Path | None:
    """The file of a SQLite URL; None for another database, or SQLite in memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def ensure_sqlite_dir(url: str) -> None:
    """Create the folder of a SQLite file URL so a fresh checkout can migrate at once."""
    if (path := sqlite_file(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def stall_limits(lease_s: float) -> dict[str, int]:
    """How long a connection of a process that holds leases of ``lease_s`` waits on a send or a
    connect before it gives up (:data:`LEASE_SHARE_FOR_A_STALL`), as libpq takes them."""
    stall_s = lease_s * LEASE_SHARE_FOR_A_STALL
    connect_s = min(POSTGRES_CONNECT_TIMEOUT_S, max(LEAST_STALL_S, math.floor(stall_s)))
    unacknowledged_ms = int(POSTGRES_LIVENESS["tcp_user_timeout"])
    send_ms = min(unacknowledged_ms, max(LEAST_STALL_S * 1000, math.floor(stall_s * 1000)))
    return {"connect_timeout": connect_s, "tcp_user_timeout": send_ms}


def postgres_connect_args(
    given: Mapping[str, Any], *, lease_s: float | None = None, lock_wait_s: float | None = None
) -> dict[str, Any]:
    """What every PostgreSQL connection of the service is opened with (the pool's and the
    wake-ups' listener's) but what the URL's query ``given`` sets itself: a bounded connect,
    and a connection that dies when its peer does (:data:`POSTGRES_LIVENESS`); for a process
    holding leases of ``lease_s``, sooner (:func:`stall_limits`); with ``lock_wait_s``, a
    statement that waits longer for a lock fails (``lock_timeout``: an outage)."""
    wanted: dict[str, Any] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S, **POSTGRES_LIVENESS}
    if lease_s is not None:
        wanted |= stall_limits(lease_s)
    args = {name: value for name, value in wanted.items() if name not in given}
    options = str(given.get("options", ""))
    added = [] if "idle_in_transaction_session_timeout" in options else [IDLE_TRANSACTION_OPTION]
    if "tcp_user_timeout" not in options:
        # The server's end gives up as soon: a client cut off in the middle of a transaction
        # (its answer unacknowledged) releases its row locks then, not when the server's TCP
        # at last gives up; the client's next connection would wait on them till then.
        unacknowledged_ms = given.get("tcp_user_timeout", wanted["tcp_user_timeout"])
        added.append(f"-c tcp_user_timeout={int(unacknowledged_ms)}")
    if lock_wait_s is not None and "lock_timeout" not in options:
        added.append(f"-c lock_timeout={round(lock_wait_s * 1000)}")
    if added:
        args["options"] = " ".join([options, *added]).strip()
    return args


def _renew_read_only(context: ExceptionContext) -> None:
    """A write refused as read-only (a replica, ``default_transaction_read_only``) discards its
    connection, and the pool's others: a session's read-only default is fixed as it connects,
    and the pool's ping passes on it, so once the database took writes again the service's
    connections went on refusing them until they were cut."""
    if getattr(context.original_exception, "sqlstate", None) == POSTGRES_READ_ONLY:
        context.is_disconnect = True


def make_engine(
    url: str, *, lease_s: float | None = None, lock_wait_s: float | None = None, **kwargs: Any
) -> Engine:
    """Build an engine; on SQLite every transaction begins IMMEDIATE in WAL mode. On PostgreSQL,
    ``lease_s`` (a worker's) bounds its connections' stalls, and ``lock_wait_s`` (the API's)
    its statements' waits for a lock (:func:`postgres_connect_args`); a connection found
    read-only is discarded (:func:`_renew_read_only`).

    IMMEDIATE takes the write lock up front, so a transaction never fails half way with
    "database is locked" when it turns from reading to writing: it waits (busy_timeout) instead.
    Readers are not blocked by it in WAL mode.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        if parsed.get_backend_name() == "postgresql":
            connect_args = postgres_connect_args(
                parsed.query, lease_s=lease_s, lock_wait_s=lock_wait_s
            )
            kwargs["connect_args"] = connect_args | kwargs.get("connect_args", {})
            engine = create_engine(url, **{"pool_pre_ping": True, **kwargs})
            event.listen(engine, "handle_error", _renew_read_only)
            return engine
        return create_engine(url, **{"pool_pre_ping": True, **kwargs})

    engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "do_connect")
    def _make_folder(*_args: Any) -> None:
        # Before each connection, not once: a folder that cannot be made yet (a permission, a
        # mount still to come) is an outage like a database server that is down. SQLite's
        # "unable to open database file" follows, which the outage handling retries and /readyz
        # reports, rather than a traceback at start and a process restarted forever.
        with suppress(OSError):
            ensure_sqlite_dir(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # A WAL is reused, never shrunk, unless told: after one large transaction (a 960,000-step
        # job deleted) it stayed 107 MB for good. Past a checkpoint it is cut back to 16 MiB,
        # four times what the automatic checkpoints (1000 pages) let it reach day to day.
        cursor.execute("PRAGMA journal_size_limit=16777216")
        cursor.close()
        if (path := sqlite_file(parsed)) is not None:
            record.info[SQLITE_FILE] = (_file_identity(path), _file_identity(wal_of(path)))

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def commit_without_waiting_for_disk(session: Session) -> None:
    """On PostgreSQL, let this transaction's commit return before its WAL is on disk.

    For a job's flushes of steps only (:func:`~service.store.queue_repo.record_progress`),
    which come every ``flush_interval_s``: waiting for the disk is most of their cost. Claims,
    lease changes (release, hand back) and a job's end keep synchronous commit: what they say
    is promised to another process (a worker told it holds a job, a client told the job ended,
    a checkpoint named) and must survive a crash of the server once the caller has been told.
    A crash of the PostgreSQL server (a clean restart or shutdown writes the WAL first) may
    lose the last ~0.6 s of such flushes (3 × ``wal_writer_delay``): the worker keeps their
    steps until its next synchronous write (the epoch's, or the job's end), which stores again
    any that are missing (``Progress.unsynced``). A job that ends otherwise before it keeps
    the gap: handed back or released into ``cancelled`` (a cancel asked meanwhile), failed on
    handing back its last attempt, or settled as a lost worker's.
    SQLite's WAL with ``synchronous=NORMAL`` risks the same on a power loss of its host.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))


def make_sessionmaker(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions that keep loaded objects readable after commit.

    Write sessions begin IMMEDIATE on SQLite; read-only ones begin DEFERRED, so that polling
    clients read a WAL snapshot without queueing behind the workers' writes.
    """
    return sessionmaker(read_engine(engine) if read_only else engine, expire_on_commit=False)


def read_engine(engine: Engine) -> Engine:
    """``engine`` for reading: on SQLite its transactions begin DEFERRED (a WAL snapshot that
    never waits for a writer)."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{SQLITE_BEGIN_OPTION: SQLITE_READ_BEGIN})
    return engine


@contextmanager
def sqlite_read_transaction(dbapi_connection: sqlite3.Connection) -> Iterator[None]:
    """A reading transaction on a connection of a :func:`make_engine` SQLite engine, begun as
    :func:`read_engine`'s begin, straight on the driver.

    For a poll of a few rows, SQLAlchemy's connection checkout, transaction and ``begin`` event
    cost the API several times the reads themselves (docs/benchmarks.md, "Metrics polling").
    The transaction ends with the block: committed, or rolled back when the block (or the
    commit) raised.
    """
    dbapi_connection.execute(f"BEGIN {SQLITE_READ_BEGIN}")
    try:
        yield
        dbapi_connection.execute("COMMIT")
    except BaseException:
        if dbapi_connection.in_transaction:
            dbapi_connection.execute("ROLLBACK")
        raise


def ping(session: Session) -> None:
    """One round trip to the database; raises when it cannot be reached."""
    session.execute(text("SELECT 1"))


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def wal_of(path: Path) -> Path:
    """A SQLite file's write-ahead log."""
    return path.with_name(f"{path.name}-wal")


def opened_file_gone(session: Session) -> bool:
    """Whether the SQLite file that ``session``'s connection opened, or its -wal file, is no
    longer at its path (deleted, or another file put there): its reads and writes still
    succeed, on a file no other process will open again, and the writes are lost when the
    process ends. A -wal deleted under running processes split the database in two: a new
    process saw a job that had succeeded as running, and its own new jobs were never seen by
    the old ones. (SQLite removes a -wal only as the last connection to it closes: not while
    this one is open.) Raises :class:`OSError` where a path cannot be looked at (its folder's
    permissions), which said "removed or replaced"."""
    connection = session.connection()
    opened = connection.connection.info.get(SQLITE_FILE)
    path = sqlite_file(connection.engine.url)
    if opened is None or path is None:
        return False
    for was, now_at in zip(opened, (path, wal_of(path)), strict=True):
        if was is None:
            continue
        try:
            found = os.stat(now_at)
        except (FileNotFoundError, NotADirectoryError):
            return True
        if (found.st_dev, found.st_ino) != was:
            return True
    return False


@dataclass(frozen=True)
class DriverConnection:
    """A driver's own connection, and the dialect of the engine it came from: what the reads
    here need of a connection."""

    dialect: Dialect
    dbapi_connection: Any


Reader = Session | Connection | DriverConnection


@functools.lru_cache(maxsize=64)  # one per statement and engine (each has its own dialect)
def _compiled(dialect: Dialect, stmt: ClauseElement) -> SQLCompiler:
    compiled = stmt.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    return compiled


def driver_rows(db: Reader, stmt: ClauseElement, values: dict[str, Any]) -> list[Any]:
    """``stmt``'s rows as the driver returns them, fetched with its own cursor in ``db``'s
    transaction.

    The statement is compiled once per dialect; its parameters go by position or by name as the
    driver's paramstyle says, defaults (SQLite's OFFSET) filled in.
    """
    return _fetch(db, stmt, values)[2]


def _fetch(
    db: Reader, stmt: ClauseElement, values: dict[str, Any]
) -> tuple[Dialect, Any, list[Any]]:
    """The dialect read with, the cursor's description of the rows, and the rows."""
    if isinstance(db, DriverConnection):
        dialect, dbapi_connection = db.dialect, db.dbapi_connection
    else:
        connection = db.connection() if isinstance(db, Session) else db
        dialect, dbapi_connection = connection.dialect, connection.connection.dbapi_connection
    compiled = _compiled(dialect, stmt)
    params = compiled.construct_params(values)
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())  # type: ignore[assignment]
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(str(compiled), params)
        return dialect, cursor.description, list(cursor.fetchall())
    finally:
        cursor.close()


Processor = Callable[[Any], Any] | None


@functools.lru_cache(maxsize=64)
def _processors(
    dialect: Dialect, stmt: Select[Any], types: tuple[Any, ...]
) -> tuple[Processor, ...]:
    """Each column's result processor, as SQLAlchemy's results choose it: by the column's type
    for this dialect and the driver's type code for the column (PostgreSQL's numbers)."""
    return tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, type_code)
        for column, type_code in zip(stmt.selected_columns, types, strict=True)
    )


def typed_rows(db: Reader, stmt: Select[Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    """``stmt``'s rows by column name, each value processed as SQLAlchemy's results process it
    (SQLite's text datetimes parsed, the columns' own types applied)."""
    dialect, description, rows = _fetch(db, stmt, values)
    processors = _processors(dialect, stmt, tuple(column[1] for column in description))
    names = [str(column.key) for column in stmt.selected_columns]
    return [
        {
            name: value if process is None else process(value)
            for name, process, value in zip(names, processors, row, strict=True)
        }
        for row in rows
    ]
