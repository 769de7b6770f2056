"""The API's side of an outage: a 503 for clients, the write probe, and the API's outage log.

Which errors mean the database is unavailable is :func:`service.store.outage.is_outage`, the
one rule that the workers use too. The API answers such an error with 503 and ``Retry-After``
(:class:`service.errors.DatabaseUnavailable`) and recovers by itself when the database is
back; any other database error stays a bug, a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.errors import DatabaseUnavailable, StorageFull
from service.store.outage import Outage, is_outage, is_storage_full
from service.store.tables import ReadinessProbe

# The API process's one outage: requests, readiness and metrics share it, so that an outage
# is logged as it starts and as it ends, not once per refused request.
API_OUTAGE = Outage(
    logging.getLogger("service.database"), while_down="answering 503 with Retry-After"
)


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    """The client's answer to an outage ``exc``: 507 ``storage_full`` for a full disk, else 503
    ``database_unavailable``."""
    return StorageFull() if is_storage_full(exc) else DatabaseUnavailable()


@contextmanager
def unavailable_as_503(what: str) -> Iterator[None]:
    """Turn an outage raised inside into :class:`DatabaseUnavailable` (for code that answers
    clients outside the routes' exception handlers: the fast lanes, the event stream)."""
    try:
        yield
    except Exception as exc:
        if is_outage(exc):
            API_OUTAGE.failed(exc, what)
            raise unavailable(exc) from exc
        raise


def probe_write(session: Session, now: datetime) -> None:
    """Write one row and commit: raises when the database cannot take a write.

    A committed change is the honest test. A transaction rolled back may never reach the
    disk (SQLite writes nothing for it), so it would pass on a read-only file or a full disk;
    an upsert of the one row of ``readiness_probe`` is written through, on both databases.
    """
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(ReadinessProbe).values(id=1, written_at=now)
    session.execute(
        stmt.on_conflict_do_update(index_elements=[ReadinessProbe.id], set_={"written_at": now})
    )
    session.commit()
