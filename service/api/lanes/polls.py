"""The fast lane of ``GET /jobs/{id}/metrics``: a live chart's poll answered in plain ASGI.

A chart polls for the steps after the last one it has, several times a second, while a job
trains on the same machine: every poll's CPU is taken from the training. Through FastAPI
(routing, dependencies, two thread hand-offs, the ORM) a poll cost about 1.2 ms of CPU; the
lane answers a well-formed poll with one read transaction on the driver's cursor and the same
JSON (:func:`service.domain.jobs.metrics_json`, which the route answers with too).

The route (:mod:`service.api.routes.jobs`) stays the reference, and the lane re-states none of
its rules: it matches the path with the route's own pattern, checks the job id with the type
the route's dependency declares (``JobIdPath``) and reads the query with the route's model
(``MetricsQuery``). Any other request, an unknown job, a database error — the lane passes the
request on untouched (a GET has no body to replay) and the route gives its answer.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.asgi import RouteQuery, send_json
from service.api.deps import JobIdPath
from service.api.routes.jobs import MetricsQuery
from service.domain import jobs

QUERY = RouteQuery(MetricsQuery)
JOB_ID: TypeAdapter[str] = TypeAdapter(JobIdPath)


def job_id_of(route: Route, path: str) -> str | None:
    """The job id of a metrics path, as the route matches and validates it, else None."""
    match = route.path_regex.match(path)
    if match is None:
        return None
    try:
        return JOB_ID.validate_python(match["job_id"])
    except ValidationError:
        return None


class MetricsPollLane:
    """ASGI middleware: answers well-formed metrics polls itself (see the module docstring).

    On SQLite the read runs on the event loop, through an engine whose one connection is the
    lane's alone (it never waits for the shared pool): a WAL snapshot read of a few rows never
    waits for a writer and takes tens of microseconds, less than a hand-off to a thread. On
    another database it goes through the thread pool and the shared pool, as the network may
    be slow.
    """

    def __init__(self, app: ASGIApp, *, route: Route) -> None:
        self.app = app
        self.route = route  # its path pattern; and what the metrics middleware labels answers with

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the poll here, or pass the request on."""
        is_get = scope["type"] == "http" and scope["method"] == "GET"
        body = await self._poll(scope) if is_get else None
        if body is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        await send_json(send, body)

    async def _poll(self, scope: Scope) -> bytes | None:
        """A well-formed poll's answer; None for any other GET (the route's to answer)."""
        job_id = job_id_of(self.route, scope["path"])
        if job_id is None:
            return None
        query = QUERY.read(scope.get("query_string", b""))
        if query is None:
            return None
        return await self._read(scope["app"].state, job_id, query.after_step, query.limit)

    async def _read(self, state: Any, job_id: str, after_step: int, limit: int) -> bytes | None:
        loop_engine: Engine | None = state.loop_engine
        engine: Engine = loop_engine or state.read_engine

        def read() -> bytes | None:
            try:
                with engine.connect() as connection, connection.begin():
                    return jobs.metrics_json(connection, job_id, after_step=after_step, limit=limit)
            except (SQLAlchemyError, engine.dialect.loaded_dbapi.Error):
                return None  # the route meets the same error and answers it its own way

        if loop_engine is not None:
            return read()
        return await anyio.to_thread.run_sync(read)
