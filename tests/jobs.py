"""Jobs straight in the database, for tests that drive workers without the API."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.schemas import JobCreate
from service.store import job_repo
from service.store.tables import Job


def queue_job(sessions: sessionmaker[Session], params: dict[str, Any]) -> str:
    """Insert a queued job with these parameters (validated as the API does); its id."""
    with sessions.begin() as session:
        job = job_repo.create_job(
            session, JobCreate.model_validate(params), max_attempts=3, now=utcnow()
        )
        return job.id


def read_job(sessions: sessionmaker[Session], job_id: str) -> Job:
    """The job as it is now."""
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job
