"""Periodic chores run once per period across every process that shares the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.store.tables import Housekeeping

NEVER = datetime(1970, 1, 1, tzinfo=UTC)


def claim_period(session: Session, chore: str, *, now: datetime, period: timedelta) -> bool:
    """Whether this caller runs ``chore`` now: True for the one caller that moves its
    ``last_run_at`` from at least ``period`` ago to ``now``.

    One conditional ``UPDATE``: on PostgreSQL a second caller waits for the first's row lock
    and then finds the condition false; on SQLite write transactions run one at a time. The
    row is made on first use (an upsert that does nothing when it exists).
    """
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(
        dialect.insert(Housekeeping)
        .values(name=chore, last_run_at=NEVER)
        .on_conflict_do_nothing(index_elements=[Housekeeping.name])
    )
    result = session.execute(
        update(Housekeeping)
        .where(Housekeeping.name == chore, Housekeeping.last_run_at <= now - period)
        .values(last_run_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
