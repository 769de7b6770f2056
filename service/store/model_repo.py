"""Models (succeeded jobs with weights) and the aliases that name them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.status import JobStatus
from service.store.cursors import newest_first
from service.store.tables import Job, ModelAlias

_is_model = and_(Job.status == JobStatus.SUCCEEDED, Job.checkpoint.is_not(None))


def list_models(
    session: Session, *, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """A page of succeeded jobs with weights, most recently finished first, and the next cursor."""
    stmt = select(Job).where(_is_model)
    return newest_first(
        session, stmt, Job.finished_at, limit=limit, cursor=cursor, source="GET /models"
    )


def get_alias(session: Session, name: str) -> ModelAlias | None:
    """The alias with this name, or None."""
    return session.get(ModelAlias, name)


def list_aliases(session: Session) -> list[ModelAlias]:
    """Every alias, by name."""
    return list(session.scalars(select(ModelAlias).order_by(ModelAlias.name)))


def aliases_of(session: Session, job_ids: Sequence[str]) -> dict[str, list[str]]:
    """The alias names pointing at each of these jobs (jobs without one are left out)."""
    if not job_ids:
        return {}
    stmt = (
        select(ModelAlias.job_id, ModelAlias.name)
        .where(ModelAlias.job_id.in_(job_ids))
        .order_by(ModelAlias.name)
    )
    found: dict[str, list[str]] = {}
    for job_id, name in session.execute(stmt):
        found.setdefault(job_id, []).append(name)
    return found


def set_alias(session: Session, *, name: str, job_id: str, now: datetime) -> ModelAlias:
    """Point ``name`` at ``job_id``: one upsert, so concurrent PUTs of a new name never collide."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(ModelAlias).values(name=name, job_id=job_id, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ModelAlias.name], set_={"job_id": job_id, "updated_at": now}
    )
    session.execute(stmt)
    alias = session.get(ModelAlias, name, populate_existing=True)
    assert alias is not None
    return alias


def delete_alias(session: Session, name: str) -> bool:
    """Remove an alias; False when there was none."""
    result = session.execute(delete(ModelAlias).where(ModelAlias.name == name))
    return bool(result.rowcount)  # type: ignore[attr-defined]
