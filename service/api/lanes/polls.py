"""The fast lane of ``GET /jobs/{id}/metrics``: a live chart's poll answered in plain ASGI.

A chart polls for the steps after the last one it has, several times a second, while a job
trains on the same machine: every poll's CPU is taken from the training. Through FastAPI
(routing, dependencies, two thread hand-offs, the ORM) a poll cost about 1.2 ms of CPU; the
lane answers a well-formed poll with one read transaction on the driver's cursor and the same
JSON (:func:`service.domain.jobs.metrics_json`, which the route answers with too).

The route (:mod:`service.api.routes.jobs`) stays the reference: any other query string, an unknown
job, a database error — the lane passes the request on untouched (a GET has no body to replay)
and the route gives its answer.
"""

from __future__ import annotations

import re
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.asgi import send_json, strict_query
from service.domain import jobs

METRICS_PATH = re.compile(r"/jobs/([0-9a-f]{32})/metrics")
# Plain decimal numbers only, small enough for a 64-bit column; the route reads the rest.
_QUERY_PATTERNS = {
    "after_step": re.compile(r"0|[1-9][0-9]{0,17}"),
    "limit": re.compile(r"[1-9][0-9]{0,8}"),
}


def poll_query(
    query_string: bytes, *, default_limit: int, max_limit: int
) -> tuple[int, int] | None:
    """(after_step, limit) of a well-formed query string, else None (the route's to answer).

    Well-formed: only ``after_step`` and ``limit``, each at most once, plain numbers in range.
    """
    values = strict_query(query_string, _QUERY_PATTERNS)
    if values is None:
        return None
    limit = int(values.get("limit", default_limit))
    return (int(values.get("after_step", 0)), limit) if limit <= max_limit else None


class MetricsPollLane:
    """ASGI middleware: answers well-formed metrics polls itself (see the module docstring).

    On SQLite the read runs on the event loop, through an engine whose one connection is the
    lane's alone (it never waits for the shared pool): a WAL snapshot read of a few rows never
    waits for a writer and takes tens of microseconds, less than a hand-off to a thread. On
    another database it goes through the thread pool and the shared pool, as the network may
    be slow.
    """

    def __init__(
        self, app: ASGIApp, *, route: BaseRoute, default_limit: int, max_limit: int
    ) -> None:
        self.app = app
        self.route = route  # what the metrics middleware labels the lane's answers with
        self.default_limit = default_limit
        self.max_limit = max_limit

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
        path = METRICS_PATH.fullmatch(scope["path"])
        if path is None:
            return None
        query = poll_query(
            scope.get("query_string", b""),
            default_limit=self.default_limit,
            max_limit=self.max_limit,
        )
        if query is None:
            return None
        return await self._read(scope["app"].state, path[1], *query)

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
