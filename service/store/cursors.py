"""Page cursors: an opaque ``<microseconds>-<job id>`` that resumes a newest-first listing."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from service.clock import CURSOR_PATTERN
from service.errors import InvalidInput

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
