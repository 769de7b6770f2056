"""The fast lane of a job's polls, ``GET /jobs/{id}/metrics`` and ``GET /jobs/{id}``, answered
in plain ASGI.

A chart polls for the steps after the last one it has, several times a second, and a client
waiting for a result polls the job's status, while the job trains on the same machine: every
poll's CPU is taken from the training. Through FastAPI (routing, dependencies, two thread
hand-offs, the ORM) a poll costs several times the CPU of the read itself: ~2.7 ms of the API's
CPU for ``GET /jobs/{id}``, against ~0.3 ms for ``/healthz`` (docs/benchmarks.md). The lane
answers a well-formed metrics poll with a read transaction on the driver's cursor and the same
JSON (:func:`service.domain.jobs.metrics_json`, which the route answers with too), and a job
poll with the job's row read without the ORM (:func:`service.domain.jobs.job_json`; the route,
which reads the ORM instance, is the reference the differential test holds it to).

Where a poll is read (:class:`PollReads`): a live chart's poll brings a few new steps, and on
SQLite such a read takes tens of microseconds on the event loop, less than a hand-off to a
thread and back costs; it runs on the driver's connection, without SQLAlchemy's, whose
checkout, transaction and events cost the API more than the rest of the poll
(docs/benchmarks.md). A page of many steps is another matter: a whole series (up to the
route's largest page) takes tens of milliseconds to read and encode, and every other request
of the process (``/healthz`` included) would wait that long. So the loop reads at
most :data:`LOOP_STEPS` steps; a page that fills them is read again, whole, in a thread, and
encoded there.

On SQLite a poll's answer is kept until the database changes (:meth:`PollReads.answer_on_loop`):
a chart's pollers ask for the same steps again and again between two of the worker's flushes,
and SQLite says exactly when any connection has committed since (``PRAGMA data_version``), so
a kept answer is the answer a read would give, for one statement instead of a transaction of
three. The edge protocol answers such polls itself (:mod:`service.api.edge.quick`).

The routes (:mod:`service.api.routes.jobs`) stay the reference, and the lane re-states none of
their rules: it matches the path with each route's own pattern, checks the job id with the type
the routes' dependency declares (``JobIdPath``) and reads the query with the route's model
(``MetricsQuery``). Any other request, an unknown job, a database error — the lane passes the
request on untouched (a GET has no body to replay) and the route gives its answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection, StaticPool
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.asgi import RouteQuery, send_json
from service.api.deps import JobIdPath
from service.api.routes.jobs import MetricsQuery
from service.domain import jobs
from service.domain.event_reads import SessionReads, StreamReads
from service.store.engines import (
    REQUEST_LOCK_WAIT_S,
    DriverConnection,
    Reader,
    make_engine,
    read_engine,
    sqlite_file,
    sqlite_read_transaction,
)

QUERY = RouteQuery(MetricsQuery)


class _NoQuery(BaseModel):
    """``GET /jobs/{id}`` declares no query parameter: a query that names any is the route's
    to refuse."""


NO_QUERY = RouteQuery(_NoQuery)
JOB_ID: TypeAdapter[str] = TypeAdapter(JobIdPath)
# The most steps a poll reads on the event loop (SQLite): a fraction of a millisecond.
LOOP_STEPS = 256
# How long a read on the loop waits for a lock before it fails (the route, or the stream's next
# try, takes over): a WAL reader waits only in rare moments (the WAL's recovery after a crash),
# but every request of the process would wait with it, for the engines' 30 s at most.
LOOP_BUSY_MS = 50
# Reads the lane runs in threads at once; its pool holds as many connections, so a read that
# got its turn never waits for a connection.
THREAD_READERS = 4
# Answers kept at one state of the database: a job's poll and a metrics poll per place a
# chart's pollers stand at (they stand at a job's last step, most of them); beyond it the
# kept answers are dropped, and read again.
KEPT_ANSWERS = 256
T = TypeVar("T")


class Larger:
    """A metrics poll whose page is more than the loop may read (:data:`LOOP_STEPS`): read in a
    thread."""


LARGER: Final = Larger()


def job_id_of(route: Route, path: str) -> str | None:
    """The job id of a path of ``route``'s, as the route matches and validates it, else None."""
    match = route.path_regex.match(path)
    if match is None:
        return None
    try:
        return JOB_ID.validate_python(match["job_id"])
    except ValidationError:
        return None


class PollReads:
    """The connections of polls (the lane's) and of event streams' polls, apart from the
    shared pool.

    The shared pool's connections go back when a request's session closes, which happens on
    the event loop: a read on the loop that waited for one could wait for the loop itself,
    and a thread that waited for one would hold a thread-pool token that the holders' routes
    may need to finish. So the lane never takes from it. On SQLite the loop reads through one
    connection of its own, opened at its first poll, on the driver's connection itself
    (:meth:`on_loop`); reads in threads take turns
    (:data:`THREAD_READERS` at a time, a limiter of their own) on a pool of as many
    connections. On another database every read goes to a thread, as the network may be slow,
    and costs round trips, each of which wakes the server's process and the thread: so these
    connections are not pinged as they are checked out (one that the server dropped fails its
    read, is discarded, and the route answers that request through its pool, which pings), and
    a read of one statement (a job's poll) runs on connections in autocommit, its own snapshot
    without a BEGIN and a COMMIT (:meth:`read_statement_in_thread`): one round trip instead of
    four (docs/benchmarks.md).
    """

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        sqlite = url.get_backend_name() == "sqlite"  # no server: polls read on the event loop
        in_memory = sqlite and sqlite_file(url) is None
        # An in-memory SQLite database is one per connection: its engine has no pool to size.
        pool = {} if in_memory else {"pool_size": THREAD_READERS, "max_overflow": 0}
        unpinged: dict[str, Any] = (
            {} if sqlite else {"pool_pre_ping": False, "lock_wait_s": REQUEST_LOCK_WAIT_S}
        )
        self._threads_base = make_engine(database_url, **pool, **unpinged)
        self.threads = read_engine(self._threads_base)
        # A single statement is a snapshot of its own: no transaction around it.
        self.statements = (
            None
            if sqlite
            else make_engine(database_url, isolation_level="AUTOCOMMIT", **pool, **unpinged)
        )
        self._driver_error: type[Exception] = self.threads.dialect.loaded_dbapi.Error
        # What a read here may raise that the routes meet too, and answer their own way: the
        # reads use the driver's cursor, so its errors come unwrapped.
        self.errors: tuple[type[Exception], ...] = (SQLAlchemyError, self._driver_error)
        self.limiter = anyio.CapacityLimiter(THREAD_READERS)
        self._loop_base = make_engine(database_url, poolclass=StaticPool) if sqlite else None
        self.on_event_loop = self._loop_base is not None  # SQLite: polls are read on the loop
        # The loop's pool's one connection (StaticPool), checked out at the first poll and held
        # until an error or close().
        self._pooled: PoolProxiedConnection | None = None
        self._driver: DriverConnection | None = None
        # Answers read on the loop's connection when SQLite's data_version was _version.
        self._answers: dict[Hashable, bytes | Larger] = {}
        self._version: int | None = None

    loop_steps = LOOP_STEPS  # the most steps one read on the event loop may take

    def for_streams(self, sessions: sessionmaker[Session]) -> StreamReads:
        """Where an event stream's polls read. On SQLite on the event loop, through this
        connection (:meth:`read`): each wake-up of a job's streams is a read of a few steps,
        cheaper there than a thread hand-off and a session of the shared pool
        (docs/benchmarks.md). Elsewhere in a thread each, in a session of ``sessions`` (the
        read pool), as the routes read: the lane's few threads are the polls', and a hundred
        streams woken at once would queue every poll behind them."""
        return self if self.on_event_loop else SessionReads(sessions)

    async def read(self, read: Callable[[Reader], T]) -> T:
        """``read`` on the loop's connection (:meth:`read_on_loop`; SQLite only, as
        :meth:`for_streams` chooses): an event stream's polls, woken with every write of their
        job, as :class:`~service.domain.event_reads.StreamReads`."""
        return self.read_on_loop(read)

    def read_in_thread(self, read: Callable[[Connection], T]) -> T:
        """``read`` in one reading transaction on a connection of the lane's pool (call it in
        a thread); a database error propagates."""
        with (
            self.threads.connect() as connection,
            self._discarded_on_error(connection),
            connection.begin(),
        ):
            return read(connection)

    def read_statement_in_thread(self, read: Callable[[Connection], T]) -> T:
        """``read``, one statement, outside any transaction where the database allows it (else
        as :meth:`read_in_thread`); call it in a thread. A database error propagates."""
        if self.statements is None:
            return self.read_in_thread(read)
        with self.statements.connect() as connection, self._discarded_on_error(connection):
            return read(connection)

    @contextmanager
    def _discarded_on_error(self, connection: Connection) -> Iterator[None]:
        """The reads run on the driver's cursor, so SQLAlchemy does not see the driver's error
        (only a failed ``ROLLBACK`` after it): the connection, perhaps broken (the server
        dropped it), is discarded here, never checked in."""
        try:
            yield
        except (self._driver_error, DBAPIError):
            if not connection.invalidated:
                connection.invalidate()
            raise

    def read_on_loop(self, read: Callable[[DriverConnection], T]) -> T:
        """``read`` on the loop's connection (SQLite), in a reading transaction begun on the
        driver's connection itself. After a database error, which propagates, the connection
        is dropped and the next read opens another: a connection left in a transaction, or
        broken, is never reused."""
        try:
            driver = self._loop_driver()
            with sqlite_read_transaction(driver.dbapi_connection):
                return read(driver)
        except self.errors:
            self._drop_loop_connection()
            raise

    def answer_on_loop(
        self, key: Hashable, read: Callable[[DriverConnection], bytes | Larger | None]
    ) -> bytes | Larger | None:
        """:meth:`on_loop` for a poll's answer, kept under ``key`` until the database changes.

        SQLite's ``data_version`` changes whenever another connection commits (the worker's
        flush, a claim, a deletion, in any process) and never otherwise; read inside the
        transaction that reads an answer, it names the state that answer was read at, and read
        again later it says whether that state is still the database's. So a kept answer is
        exactly what the read would answer now. None (no such job, a database error) is not
        kept."""
        try:
            driver = self._loop_driver()
            connection = driver.dbapi_connection
            kept = self._answers.get(key)
            if kept is not None and _data_version(connection) == self._version:
                return kept
            with sqlite_read_transaction(connection):
                version = _data_version(connection)
                answer = read(driver)
        except self.errors:
            self._drop_loop_connection()
            return None
        if version != self._version or len(self._answers) >= KEPT_ANSWERS:
            self._answers.clear()
            self._version = version
        if answer is not None:
            self._answers[key] = answer
        return answer

    def _loop_driver(self) -> DriverConnection:
        """The loop's connection, opened at the first read and after an error."""
        assert self._loop_base is not None, "only SQLite reads on the event loop"
        if self._driver is None:
            self._pooled = self._loop_base.raw_connection()
            self._driver = DriverConnection(self._loop_base.dialect, self._pooled.driver_connection)
            self._driver.dbapi_connection.execute(f"PRAGMA busy_timeout={LOOP_BUSY_MS}")
        return self._driver

    def on_loop(self, read: Callable[[DriverConnection], T]) -> T | None:
        """:meth:`read_on_loop`, None on a database error (the route meets the same error and
        answers it its own way)."""
        try:
            return self.read_on_loop(read)
        except self.errors:
            return None

    def _drop_loop_connection(self) -> None:
        self._forget_answers()
        pooled, self._pooled, self._driver = self._pooled, None, None
        if pooled is not None:
            pooled.invalidate()  # closes the driver's connection; the pool opens a new one

    def _forget_answers(self) -> None:
        # data_version counts per connection: the next one's numbers name other states.
        self._answers.clear()
        self._version = None

    def close(self) -> None:
        """Close every connection the lane opened."""
        self._threads_base.dispose()
        if self.statements is not None:
            self.statements.dispose()
        if self._pooled is not None:
            self._pooled.close()
            self._pooled = self._driver = None
        self._forget_answers()
        if self._loop_base is not None:
            self._loop_base.dispose()


def _data_version(connection: Any) -> int:
    version: int = connection.execute("PRAGMA data_version").fetchone()[0]
    return version


def _read(
    reads: PollReads, read: Callable[[Connection], T | None], *, statement: bool = False
) -> T | None:
    """``read`` in one read transaction of the lane's threads (one ``statement``: in none);
    None on a database error (the route meets the same error and answers it its own way)."""
    try:
        if statement:
            return reads.read_statement_in_thread(read)
        return reads.read_in_thread(read)
    except reads.errors:
        return None


@dataclass(frozen=True)
class Poll:
    """A well-formed poll: a job's (``after_step`` None) or its metrics'."""

    route: Route
    job_id: str
    after_step: int | None = None
    limit: int = 0

    @property
    def key(self) -> tuple[str, int | None, int]:
        """What tells one poll's answer from another's."""
        return self.job_id, self.after_step, self.limit

    def read_on_loop(self, db: DriverConnection) -> bytes | Larger | None:
        """The answer, read on the loop; :data:`LARGER` for a page of more steps than the loop
        may read (it is read again, whole, in a thread); None: no such job."""
        if self.after_step is None:
            return jobs.job_json(db, self.job_id)
        probe = min(self.limit, LOOP_STEPS)
        page = jobs.metrics_page(db, self.job_id, after_step=self.after_step, limit=probe)
        if page is None or len(page["steps"]) < probe or self.limit == probe:
            return None if page is None else jobs.encode_metrics(page)
        return LARGER  # a full probe: the page may be large

    def read_in_thread(self, db: Connection) -> bytes | None:
        """The answer, read whole (call it in a thread)."""
        if self.after_step is None:
            return jobs.job_json(db, self.job_id)
        return jobs.metrics_json(db, self.job_id, after_step=self.after_step, limit=self.limit)


class PollLane:
    """ASGI middleware: answers well-formed job and metrics polls itself (see the module
    docstring)."""

    def __init__(self, app: ASGIApp, *, metrics_route: Route, job_route: Route) -> None:
        self.app = app
        # Their path patterns; and what the metrics middleware labels answers with.
        self.metrics_route, self.job_route = metrics_route, job_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the poll here, or pass the request on."""
        is_get = scope["type"] == "http" and scope["method"] == "GET"
        poll = self.poll_of(scope) if is_get else None
        body = None if poll is None else await self._answer(scope["app"].state.poll_reads, poll)
        if poll is None or body is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = poll.route
        await send_json(send, body)

    def poll_of(self, scope: Scope) -> Poll | None:
        """The poll a GET asks for, read as its route reads it; None for any other GET (the
        routes')."""
        query_string = scope.get("query_string", b"")
        polled = job_id_of(self.job_route, scope["path"])
        if polled is not None:
            return None if NO_QUERY.read(query_string) is None else Poll(self.job_route, polled)
        job_id = job_id_of(self.metrics_route, scope["path"])
        query = None if job_id is None else QUERY.read(query_string)
        if job_id is None or query is None:
            return None
        return Poll(self.metrics_route, job_id, query.after_step, query.limit)

    @staticmethod
    def answer_now(reads: PollReads, poll: Poll) -> bytes | Larger | None:
        """``poll``'s answer read on the event loop (SQLite), kept until the database changes;
        :data:`LARGER`: read it in a thread; None: the route's to answer."""
        return reads.answer_on_loop(poll.key, poll.read_on_loop)

    @classmethod
    async def _answer(cls, reads: PollReads, poll: Poll) -> bytes | None:
        if reads.on_event_loop:
            body = cls.answer_now(reads, poll)
            if not isinstance(body, Larger):
                return body
            # A page of many steps: read it whole (a snapshot of its own), encoded off the loop.
        return await anyio.to_thread.run_sync(
            functools.partial(_read, statement=poll.after_step is None),
            reads,
            poll.read_in_thread,
            limiter=reads.limiter,
        )
