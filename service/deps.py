"""FastAPI dependencies: settings, database sessions, and lookup-or-404."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from service import repository
from service.clock import JOB_ID_PATTERN
from service.errors import NotFound
from service.models import Job
from service.predict import ModelCache
from service.settings import Settings

# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in
# the thread pool, and each such hand-off cost more than a whole prediction (py-spy under load,
# docs/benchmarks.md). A Session does no I/O until it is used; closing it returns its
# connection to the pool (a rollback: microseconds on SQLite, one round trip on PostgreSQL).


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A read session (DEFERRED on SQLite: a snapshot that never waits for writers)."""
    with request.app.state.read_sessions() as session:
        yield session


async def get_write_session(request: Request) -> AsyncIterator[Session]:
    """A write session (IMMEDIATE on SQLite: takes the write lock up front)."""
    with request.app.state.write_sessions() as session:
        yield session


async def get_model_cache(request: Request) -> ModelCache:
    """The process's cache of loaded models."""
    cache: ModelCache = request.app.state.model_cache
    return cache


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
WriteSessionDep = Annotated[Session, Depends(get_write_session)]
ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]
JobIdPath = Annotated[
    str, Path(pattern=JOB_ID_PATTERN, description="A job id: 32 lowercase hex digits.")
]


def _job_or_404(session: Session, job_id: str) -> Job:
    job = repository.get_job(session, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    return job


def job_or_404(job_id: JobIdPath, session: SessionDep) -> Job:
    """The job named in the path, read in the request's read session, or 404."""
    return _job_or_404(session, job_id)


def job_for_update_or_404(job_id: JobIdPath, session: WriteSessionDep) -> Job:
    """The job named in the path, read in the request's write session, or 404."""
    return _job_or_404(session, job_id)


JobDep = Annotated[Job, Depends(job_or_404)]
JobForUpdateDep = Annotated[Job, Depends(job_for_update_or_404)]
