"""FastAPI dependencies: settings, database sessions, and lookup-or-404."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.api.asgi import query_names
from service.clock import CURSOR_PATTERN, JOB_ID_PATTERN, MAX_PAGE
from service.errors import InvalidInput, NotFound
from service.schemas import IN_DECIMAL_DIGITS
from service.serving.predictor import Predictor
from service.settings import Settings
from service.store import availability, job_repo
from service.store.tables import Job

log = logging.getLogger("service.database")

# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in
# the thread pool, and such a hand-off costs more than a whole prediction (measured in
# docs/benchmarks.md). A Session does no I/O until it is used; closing it returns its
# connection to the pool (a rollback).


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A read session (DEFERRED on SQLite: a snapshot that never waits for writers)."""
    session = request.app.state.read_sessions()
    try:
        yield session
    finally:
        close_after_answer(session)


async def get_write_session(request: Request) -> AsyncIterator[Session]:
    """A write session (IMMEDIATE on SQLite: takes the write lock up front)."""
    session = request.app.state.write_sessions()
    try:
        yield session
        # The route wrote (or read to write) without an error: an outage logged before is
        # over. Reads alone would not say it: they go on while a database refuses writes.
        availability.API_OUTAGE.ok()
    finally:
        close_after_answer(session)


def close_after_answer(session: Session) -> None:
    """Close a request's session, which a dependency does once the answer has begun. Closing
    rolls back what is open, and on a connection that died meanwhile (PostgreSQL restarted, or
    its backend was terminated) that rollback fails: raised then, the error reset the client's
    connection mid-answer. The connection is dropped from the pool either way (SQLAlchemy
    invalidates it); the error is logged, since the answer is already the client's."""
    try:
        session.close()
    except SQLAlchemyError as exc:
        log.warning("a request's database session failed as it closed (%s)", type(exc).__name__)


async def get_read_sessions(request: Request) -> sessionmaker[Session]:
    """The read-session factory, for routes that open short sessions themselves (streams)."""
    sessions: sessionmaker[Session] = request.app.state.read_sessions
    return sessions


async def get_predictor(request: Request) -> Predictor:
    """The process's predictor (model resolutions, loaded models, batched forward passes)."""
    predictor: Predictor = request.app.state.predictor
    return predictor


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
WriteSessionDep = Annotated[Session, Depends(get_write_session)]
ReadSessionsDep = Annotated[sessionmaker[Session], Depends(get_read_sessions)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
# The paging of every listing (GET /jobs, /models, /sweeps): how many at most, and where from.
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE), IN_DECIMAL_DIGITS]
PageCursor = Annotated[
    str | None, Query(pattern=CURSOR_PATTERN, description="The `next` of the previous page.")
]
JobIdPath = Annotated[
    str, Path(pattern=JOB_ID_PATTERN, description="A job id: 32 lowercase hex digits.")
]


def _job_or_404(session: Session, job_id: str, *, lock: bool = False) -> Job:
    job = job_repo.lock_job(session, job_id) if lock else job_repo.get_job(session, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    return job


def job_or_404(job_id: JobIdPath, session: SessionDep) -> Job:
    """The job named in the path, read in the request's read session, or 404."""
    return _job_or_404(session, job_id)


def job_for_update_or_404(job_id: JobIdPath, session: WriteSessionDep) -> Job:
    """The job named in the path, read and locked in the request's write session, or 404:
    what the route decides from it (a cancel, a delete) cannot be overtaken by a worker's
    write that commits meanwhile (on PostgreSQL a plain read let a cancel answer 200 for a
    job that had just succeeded). SQLite's write sessions hold the database's lock anyway."""
    return _job_or_404(session, job_id, lock=True)


JobDep = Annotated[Job, Depends(job_or_404)]
JobForUpdateDep = Annotated[Job, Depends(job_for_update_or_404)]


QUERY_NAMES_ATTR = "_mnist_query_names"


def _query_names(dependant: Dependant) -> set[str]:
    names: set[str] = set()
    for param in dependant.query_params:
        # A route may declare its query as one Pydantic model: its fields are the parameters.
        model = param.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names |= query_names(model)
        else:
            names.add(param.alias)
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _declared_query_names(route: APIRoute) -> frozenset[str]:
    # Kept on the route itself: a table keyed by id(route) would outlive the routes of apps
    # that are gone, and hand a new route at the same address the old one's names.
    names: frozenset[str] | None = getattr(route, QUERY_NAMES_ATTR, None)
    if names is None:
        names = frozenset(_query_names(route.dependant))
        setattr(route, QUERY_NAMES_ATTR, names)
    return names


async def forbid_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not declare, or one given twice.

    A misspelt parameter (``?limt=5``) would otherwise be ignored without a word, and of a
    repeated one (``?limit=5&limit=500``) only the last would count. Every query parameter
    of this API is a single value.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    query = request.query_params
    unknown = sorted(set(query) - _declared_query_names(route))
    if unknown:
        raise InvalidInput(
            f"unknown query parameter {unknown[0]!r}",
            details=[
                {"loc": ["query", name], "msg": "not a parameter of this route"} for name in unknown
            ],
        )
    repeated = sorted(name for name in set(query) if len(query.getlist(name)) > 1)
    if repeated:
        raise InvalidInput(
            f"query parameter {repeated[0]!r} is given more than once",
            details=[{"loc": ["query", name], "msg": "given more than once"} for name in repeated],
        )
