"""Keyset pages of jobs, newest first, and their cursors: an opaque ``<microseconds>-<job id>``.

One paging rule for every listing (``GET /jobs`` by creation, ``GET /models`` by finish):
ordered by a time column then the id, both descending, resumed strictly after the last row
shown, so rows written meanwhile never shift a page.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.clock import CURSOR_PATTERN
from service.errors import InvalidInput
from service.store.tables import Job

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
    stmt: Select[Job],
    when: InstrumentedAttribute[datetime] | InstrumentedAttribute[datetime | None],
    *,
    limit: int,
    cursor: str | None,
    source: str,
) -> tuple[list[Job], str | None]:
    """A page of ``stmt``'s jobs ordered by ``when`` then id, newest first, and the next cursor
    (None on the last page)."""
    stmt = stmt.order_by(when.desc(), Job.id.desc()).limit(limit + 1)
    if cursor is not None:
        after, job_id = decode_cursor(cursor, source)
        stmt = stmt.where(or_(when < after, and_(when == after, Job.id < job_id)))
    jobs = list(session.scalars(stmt))
    if len(jobs) <= limit:
        return jobs, None
    last = jobs[limit - 1]
    last_when = getattr(last, when.key)
    assert last_when is not None
    return jobs[:limit], encode_cursor(last_when, last.id)
