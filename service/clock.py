"""Time and identifiers shared by the API, the workers and the command line."""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_PAGE = 100  # the most items a page of a listing holds (jobs, sweeps, models)
# A page cursor of GET /jobs: the last job's creation time (µs since the epoch) and its id.
# Every string this pattern admits is a position in the list, so none is refused later.
CURSOR_PATTERN = r"^[0-9]{1,16}-[0-9a-f]{32}$"


def is_job_id(value: object) -> bool:
    """Whether ``value`` is a job's id, as :data:`JOB_ID_PATTERN` has it."""
    return isinstance(value, str) and re.fullmatch(JOB_ID_PATTERN, value) is not None


def is_key_text(value: str) -> bool:
    """Whether ``value`` can be an API key: printable ASCII without spaces, as a header carries
    it (the settings refuse other keys, and the command line other keys given to it)."""
    return all("!" <= ch <= "~" for ch in value)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A 32-hex-digit id whose first 12 digits are the creation time in ms (ids sort by age)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"
