"""The database's clock, on which leases and workers' heartbeats are written and judged.

Workers on several hosts disagree on the time, and a statement may wait (a lock, a slow round
trip) after its writer read its own clock: a lease taken from the worker's clock was over
before it began for a worker behind, and a worker ahead took every healthy job of the others;
an API host ahead of the workers found none of them alive. One clock for all of it, read when
the statement runs, has none of that. The other times a row holds (a job's ``started_at`` and
``finished_at``, a worker's ``started_at``) stay their writer's, as a job's duration and rate
are read from them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from service.store.tables import UTCDateTime


class _DatabaseTime(FunctionElement[datetime]):
    """The database's clock ``seconds`` from now, as a time column stores it (naive UTC)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "database_time"


@compiles(_DatabaseTime, "postgresql")
def _postgres_time(element: _DatabaseTime, compiler: SQLCompiler, **kw: Any) -> str:
    # clock_timestamp(): the time the row is written, after any lock the statement waited on
    # (now() would be the transaction's start).
    seconds = compiler.process(element.clauses, **kw)
    return f"((clock_timestamp() AT TIME ZONE 'UTC') + make_interval(secs => {seconds}))"


@compiles(_DatabaseTime, "sqlite")
def _sqlite_time(element: _DatabaseTime, compiler: SQLCompiler, **kw: Any) -> str:
    # 'now' is one value through a step of the statement (sqlite3_step), read once its lock is
    # held; in milliseconds, padded to the six digits of the timestamps SQLAlchemy writes, so
    # the two compare as text.
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', julianday('now') + ({seconds}) / 86400.0) || '000')"


def database_time(seconds: Any = 0.0) -> ColumnElement[datetime]:
    """The database's clock ``seconds`` (a value or a bound parameter) from now, when the
    statement runs: the end of a lease taken now, or (negative) the oldest heartbeat of a
    live worker."""
    return _DatabaseTime(seconds if isinstance(seconds, ColumnElement) else float(seconds))
