"""SQL for the artifacts stored in the database: checkpoints and training states as rows.

The rows are written by the transaction that names them (:func:`service.store.queue_repo.
finish_job`, :func:`~service.store.queue_repo.record_progress`), so what a job's row names is
always there, whole. Which store an artifact lives in is :mod:`service.store.artifacts.backends`'s
business; this module only reads and writes the table.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from service.store.tables import Artifact

CHECKPOINT = "checkpoint"
RESUME = "resume"


@dataclass(frozen=True)
class Blob:
    """An artifact's bytes, waiting for the transaction that names it."""

    job_id: str
    name: str
    kind: str  # CHECKPOINT or RESUME
    attempt: int
    epoch: int | None
    data: bytes


def put(session: Session, blob: Blob, *, now: datetime) -> None:
    """Store ``blob``. A training state replaces the job's earlier ones: a retry resumes from
    the newest, the one the same transaction names."""
    if blob.kind == RESUME:
        drop(session, blob.job_id, kind=RESUME)
    session.execute(
        insert(Artifact).values(
            name=blob.name,
            job_id=blob.job_id,
            kind=blob.kind,
            attempt=blob.attempt,
            epoch=blob.epoch,
            size_bytes=len(blob.data),
            data=blob.data,
            created_at=now,
        )
    )


def drop(session: Session, job_id: str, *, kind: str | None = None) -> int:
    """Delete a job's artifacts (of one ``kind``, or all); how many there were."""
    where = [Artifact.job_id == job_id]
    if kind is not None:
        where.append(Artifact.kind == kind)
    result = session.execute(delete(Artifact).where(*where))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def data(session: Session, name: str) -> bytes | None:
    """The bytes of the artifact ``name``, or None when there is none."""
    return session.scalar(select(Artifact.data).where(Artifact.name == name))


def sizes(session: Session, names: Collection[str]) -> dict[str, int]:
    """The sizes of those of ``names`` that are stored (the bytes themselves are not read)."""
    if not names:
        return {}
    rows = session.execute(
        select(Artifact.name, Artifact.size_bytes).where(Artifact.name.in_(names))
    )
    return {name: size for name, size in rows}
