"""How many bytes the database takes: what ``/readyz`` and ``mnist_store_bytes`` report."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from service.store.engines import sqlite_file, wal_of


def _file_bytes(path: Path) -> int | None:
    """The file's size; 0 where there is none, None where it cannot be looked at (its folder
    taken out of reach: its permissions), which answered /readyz and /metrics with a 500."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError:
        return None


def store_bytes(session: Session) -> int | None:
    """PostgreSQL: ``pg_database_size`` of the current database. SQLite: the file and its
    write-ahead log (committed pages wait there until a checkpoint copies them over); 0 for an
    in-memory database; None while the files cannot be looked at."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return int(session.scalar(text("SELECT pg_database_size(current_database())")) or 0)
    path = sqlite_file(bind.engine.url)
    if path is None:
        return 0
    sizes = [_file_bytes(path), _file_bytes(wal_of(path))]
    return None if None in sizes else sum(s for s in sizes if s is not None)


def describe(session: Session) -> str:
    """What :func:`store_bytes` counts on this backend, for a reader of ``/readyz``."""
    if session.get_bind().dialect.name == "postgresql":
        return "pg_database_size"
    return "SQLite file and WAL"
