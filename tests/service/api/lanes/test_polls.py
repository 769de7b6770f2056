"""Which metrics polls the fast lane reads itself: those the route reads the same way."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from starlette.routing import Route

from service.api.lanes.polls import KEPT_ANSWERS, LOOP_BUSY_MS, QUERY, PollReads, job_id_of
from service.api.routes import jobs as jobs_routes
from service.store.engines import DriverConnection

JOB = "0123456789abcdef0123456789abcdef"


def read(query: bytes) -> tuple[int, int] | None:
    parsed = QUERY.read(query)
    return None if parsed is None else (parsed.after_step, parsed.limit)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (0, 1000)),
        (b"after_step=0", (0, 1000)),
        (b"after_step=4711", (4711, 1000)),
        (b"limit=1", (0, 1)),
        (b"limit=100000&after_step=9", (9, 100_000)),
        (b"limit=010", (0, 10)),  # as the route reads them: the same model
        (f"after_step={jobs_routes.MAX_STEP}".encode(), (jobs_routes.MAX_STEP, 1000)),
    ],
)
def test_polls_the_route_takes_are_read_as_it_reads_them(
    query: bytes, expected: tuple[int, int]
) -> None:
    assert read(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        b"limit=0",
        b"limit=100001",
        b"after_step=-1",
        b"after_step=1.5",
        b"after_step=1.0",  # decimal digits only (QueryInt), as the route takes them
        b"after_step=%2B1",
        b"after_step=+1",  # a space, as a form decodes it
        b"after_step=1_0",
        b"after_step=",
        f"after_step={jobs_routes.MAX_STEP + 1}".encode(),
        b"after_step=1&after_step=2",
        b"limt=5",
        b"after_step=1&x=",
    ],
)
def test_every_other_query_is_left_to_the_route(query: bytes) -> None:
    assert read(query) is None


def metrics_route() -> Route:
    (route,) = [
        r
        for r in jobs_routes.router.routes
        if isinstance(r, Route) and r.path == "/jobs/{job_id}/metrics"
    ]
    return route


def test_a_metrics_path_is_matched_and_its_id_checked_as_the_route_does() -> None:
    route = metrics_route()
    assert job_id_of(route, f"/jobs/{JOB}/metrics") == JOB
    for path in (
        f"/jobs/{JOB}/metrics/",
        f"/jobs/{JOB.upper()}/metrics",
        f"/jobs/{JOB}\n/metrics",
        "/jobs/x/metrics",
        f"/jobs/{JOB}",
    ):
        assert job_id_of(route, path) is None, path


def test_the_lanes_connections_open_for_an_in_memory_database() -> None:
    reads = PollReads("sqlite://")  # no pool to size: one database per connection
    try:
        assert reads.on_event_loop and reads.threads.dialect.name == "sqlite"
        assert reads.on_loop(lambda c: c.dbapi_connection.execute("SELECT 1").fetchone()) == (1,)
    finally:
        reads.close()


def test_after_a_database_error_the_loop_reads_on_a_fresh_connection(tmp_path: Path) -> None:
    reads = PollReads(f"sqlite:///{tmp_path / 'polls.db'}")
    try:

        def fails(c: DriverConnection) -> None:
            c.dbapi_connection.execute("SELECT * FROM no_such_table")

        assert reads.on_loop(fails) is None  # the route answers it its own way
        broken = reads.on_loop(lambda c: c.dbapi_connection)
        assert broken is not None and not broken.in_transaction
        broken.close()  # a connection gone bad under the lane
        assert reads.on_loop(lambda c: c.dbapi_connection.execute("SELECT 1").fetchone()) is None
        fresh = reads.on_loop(lambda c: c.dbapi_connection)
        assert fresh is not None and fresh is not broken
        assert reads.on_loop(lambda c: c.dbapi_connection.execute("SELECT 1").fetchone()) == (1,)
    finally:
        reads.close()


def test_a_read_on_the_loop_waits_for_a_lock_only_briefly(tmp_path: Path) -> None:
    # Every request of the process waits while the loop does: not the engines' 30 s.
    reads = PollReads(f"sqlite:///{tmp_path / 'polls.db'}")
    try:

        def busy_ms(c: DriverConnection) -> int:
            return int(c.dbapi_connection.execute("PRAGMA busy_timeout").fetchone()[0])

        assert reads.read_on_loop(busy_ms) == LOOP_BUSY_MS
        with pytest.raises(sqlite3.OperationalError):  # raised, and the connection dropped
            reads.read_on_loop(lambda c: c.dbapi_connection.execute("SELECT * FROM nothing"))
        assert reads.read_on_loop(busy_ms) == LOOP_BUSY_MS  # so is the next one's
    finally:
        reads.close()


class CountedReads:
    """A poll's read of one table's rows, counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, c: DriverConnection) -> bytes | None:
        self.count += 1
        rows = c.dbapi_connection.execute("SELECT x FROM t ORDER BY x").fetchall()
        return repr(rows).encode() if rows else None


def test_an_answer_is_kept_until_any_other_connection_commits(tmp_path: Path) -> None:
    path = tmp_path / "polls.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x INTEGER)")
    reads = PollReads(f"sqlite:///{path}")
    read = CountedReads()
    try:
        assert reads.answer_on_loop("a", read) is None  # no rows: nothing kept
        assert reads.answer_on_loop("a", read) is None and read.count == 2
        writer.execute("INSERT INTO t VALUES (1)")
        assert reads.answer_on_loop("a", read) == b"[(1,)]"
        assert reads.answer_on_loop("a", read) == b"[(1,)]" and read.count == 3  # kept
        assert reads.answer_on_loop("b", read) == b"[(1,)]" and read.count == 4  # its own key
        writer.execute("BEGIN")
        writer.execute("INSERT INTO t VALUES (2)")
        assert reads.answer_on_loop("a", read) == b"[(1,)]" and read.count == 4  # not committed
        writer.execute("COMMIT")
        assert reads.answer_on_loop("a", read) == b"[(1,), (2,)]" and read.count == 5
        assert reads.answer_on_loop("b", read) == b"[(1,), (2,)]" and read.count == 6
        writer.execute("UPDATE t SET x = 3 WHERE x = 1")  # another table's write would count too
        assert reads.answer_on_loop("b", read) == b"[(2,), (3,)]" and read.count == 7
    finally:
        reads.close()
        writer.close()


def test_kept_answers_are_bounded_and_go_with_their_connection(tmp_path: Path) -> None:
    path = tmp_path / "polls.db"
    with sqlite3.connect(path) as writer:
        writer.execute("CREATE TABLE t (x INTEGER)")
        writer.execute("INSERT INTO t VALUES (1)")
    reads = PollReads(f"sqlite:///{path}")
    read = CountedReads()
    try:
        for key in range(KEPT_ANSWERS):
            reads.answer_on_loop(key, read)
        reads.answer_on_loop(0, read)
        assert read.count == KEPT_ANSWERS  # all kept
        reads.answer_on_loop(KEPT_ANSWERS, read)  # one more: the kept ones make room
        reads.answer_on_loop(0, read)
        assert read.count == KEPT_ANSWERS + 2

        def fails(c: DriverConnection) -> bytes:
            c.dbapi_connection.execute("SELECT * FROM no_such_table")
            return b""

        assert reads.answer_on_loop("broken", fails) is None  # the route answers it
        reads.answer_on_loop(0, read)  # a fresh connection: nothing it did not read is kept
        assert read.count == KEPT_ANSWERS + 3
    finally:
        reads.close()
