"""Keyset pages, newest first, and their cursors: an opaque ``<microseconds>-<id>``.

One paging rule for every listing (``GET /jobs`` and ``GET /sweeps`` by creation, ``GET /models``
by finish):
ordered by a time column then the id, both descending, resumed strictly after the last row
shown, so rows written meanwhile never shift a page.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.clock import CURSOR_PATTERN
from service.errors import InvalidInput

Row = TypeVar("Row")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_cursor(when: datetime, key: str) -> str:
    """The cursor of the row last shown: its time and its id (ties broken by id)."""
    return f"{(when - _EPOCH) // _MICROSECOND}-{key}"


def decode_cursor(cursor: str, source: str) -> tuple[datetime, str]:
    """``(time, id)`` of a cursor ``source`` handed out; 422 for anything else."""
    if re.fullmatch(CURSOR_PATTERN, cursor) is None:
        raise InvalidInput(
            f"cursor is not a value returned as 'next' by {source}",
            details=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        )
    micros, _, job_id = cursor.partition("-")
    return _EPOCH + int(micros) * _MICROSECOND, job_id


def newest_first(
    session: Session,
    stmt: Select[Row],
    when: InstrumentedAttribute[datetime] | InstrumentedAttribute[datetime | None],
    *,
    limit: int,
    cursor: str | None,
    source: str,
) -> tuple[list[Row], str | None]:
    """A page of ``stmt``'s rows (of the table ``when`` belongs to, keyed by its ``id``)
    ordered by ``when`` then id, newest first, and the next cursor (None on the last page)."""
    key: Any = when.class_.id
    stmt = stmt.order_by(when.desc(), key.desc()).limit(limit + 1)
    if cursor is not None:
        after, row_id = decode_cursor(cursor, source)
        stmt = stmt.where(or_(when < after, and_(when == after, key < row_id)))
    jobs: list[Row] = list(session.scalars(stmt))
    if len(jobs) <= limit:
        return jobs, None
    last = jobs[limit - 1]
    last_when = getattr(last, when.key)
    assert last_when is not None
    return jobs[:limit], encode_cursor(last_when, getattr(last, key.key))
