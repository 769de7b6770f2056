"""The routes' dependencies run on the event loop, unless they read the database."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.requests import Request

from service.api.app import all_routes, create_app
from service.api.deps import get_session, get_write_session, job_for_update_or_404, job_or_404
from service.settings import Settings
from service.store.engines import make_engine, make_sessionmaker

# The dependencies that read the database: blocking I/O, in the thread pool on purpose.
READ_THE_DATABASE = {job_or_404, job_for_update_or_404}


def dependencies(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    """Every dependency of a route, its dependencies' included."""
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from dependencies(sub)


def runs_on_the_loop(call: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def test_only_the_dependencies_that_read_the_database_are_plain_functions(
    settings: Settings,
) -> None:
    # FastAPI runs a plain ``def`` dependency in the thread pool: a hand-off per request,
    # measured at about a fifth of the API's CPU for a paced event stream's start
    # (docs/benchmarks.md). A dependency that does no blocking I/O is ``async def``; only those
    # that read the database are plain functions.
    app = create_app(settings)
    routes = [route for route in all_routes(app) if isinstance(route, APIRoute)]
    found = {
        (f"{sorted(route.methods or ())} {route.path}", call.__qualname__): call
        for route in routes
        for call in dependencies(route.dependant)
    }
    for depends in app.router.dependencies:
        assert depends.dependency is not None
        found[("(the app)", depends.dependency.__qualname__)] = depends.dependency
    # The walk finds every route, each method of a path apart.
    assert {
        ("['GET'] /jobs/{job_id}/events", "get_read_sessions"),
        ("['POST'] /jobs", "get_write_session"),
    } <= found.keys()
    assert {call for call in found.values() if not runs_on_the_loop(call)} <= READ_THE_DATABASE
    assert all(not runs_on_the_loop(call) for call in READ_THE_DATABASE)


def test_a_session_whose_connection_died_under_the_answer_closes_quietly(
    postgres_url: str,
) -> None:
    # FastAPI closes a request's session once the answer has begun: a rollback on a
    # connection the server dropped meanwhile raised there and reset the client's connection.
    engine = make_engine(postgres_url)
    admin = make_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        sessions = make_sessionmaker(engine)
        request = cast(
            Request,
            SimpleNamespace(
                app=SimpleNamespace(
                    state=SimpleNamespace(read_sessions=sessions, write_sessions=sessions)
                )
            ),
        )

        async def answer(dependency: Callable[[Request], AsyncIterator[Session]]) -> None:
            requested = dependency(request)
            session = await anext(requested)
            backend = session.scalar(text("SELECT pg_backend_pid()"))  # a transaction open
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
            assert await anext(requested, None) is None  # closed, nothing raised

        for dependency in (get_session, get_write_session):
            asyncio.run(answer(dependency))
        with sessions() as session:  # the dead connection left the pool
            assert session.scalar(text("SELECT 1")) == 1
    finally:
        admin.dispose()
        engine.dispose()
