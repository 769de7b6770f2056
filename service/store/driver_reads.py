"""Reads on the driver's own cursor: a statement compiled once per dialect, its rows fetched
without SQLAlchemy's result objects.

A poll of a few rows paid more for SQLAlchemy's connection, transaction and result machinery
than for the read itself (docs/benchmarks.md, "Metrics polling"); for a large page of steps its
result rows cost as much again as the driver's fetch. The repositories read polled data through
here, whether they are handed a Session (a route), a Connection (the polls' fast lane in a
thread) or a :class:`DriverConnection` (the lane on SQLite's event loop), so that the lane and
the routes read alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement


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
