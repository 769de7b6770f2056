"""The fast lane of a job's event stream, ``GET /jobs/{id}/events``, started in plain ASGI.

A crowd of watchers opens a stream each as a job starts, and each start went through FastAPI:
the routing, the route's dependencies (the stream's place, the path, the header and the query
validated one by one, a context manager held for the response), its exception layers. That
start was most of what a stream cost the API, beside a job that trains on the same cores
(docs/benchmarks.md): the stream's body, woken with each of the job's writes, shares its reads
and its events with the job's other streams.

The route (:mod:`service.api.routes.events`) stays the reference, and the lane re-states none
of its rules: it matches the path with the route's own pattern, validates the job id, the
query and the ``Last-Event-ID`` header with the types the route declares, reads the stream's
start with the route's own :func:`~service.api.routes.events.stream_start`, holds a place
under the same cap, and answers with the same :func:`~service.api.routes.events.open_stream`;
an error of the service's that it meets there (no place left, an unknown job, the database
unavailable) it answers as FastAPI's handler does (:func:`~service.api.asgi.error_response`),
rather than have the route read the database again for it. Any other request (a refused id, an
undeclared parameter, an unexpected database error) it passes on untouched, before anything
was sent, and the route gives its answer.
"""

from __future__ import annotations

from contextlib import ExitStack

from pydantic import TypeAdapter, ValidationError
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.asgi import RouteQuery, error_response, header
from service.api.lanes.polls import job_id_of
from service.api.routes.events import (
    EventsQuery,
    LastEventIdHeader,
    open_stream,
    repeats_last_event_id,
    stream_start,
)
from service.api.security import app_path
from service.domain import stream_slots
from service.domain.events import Cursor
from service.errors import InvalidInput, ServiceError
from service.settings import Settings

QUERY = RouteQuery(EventsQuery)
LAST_EVENT_ID: TypeAdapter[str | None] = TypeAdapter(LastEventIdHeader)


class StreamLane:
    """ASGI middleware: starts well-formed event streams itself (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, route: Route) -> None:
        self.app = app
        self.route = route  # its path pattern; and what the metrics middleware labels with
        self.answered = 0  # requests this lane answered (what the tests look at)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the stream here, or pass the request on."""
        job_id = cursor = None
        if scope["type"] == "http" and scope["method"] == "GET":
            job_id = job_id_of(self.route, scope["path"])
            cursor = None if job_id is None else await read_cursor(scope)
        if job_id is None or cursor is None:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        settings: Settings = state.settings
        scope["route"] = self.route  # the metrics' label, whoever answers
        with ExitStack() as place:
            try:
                place.enter_context(stream_slots.OPEN_STREAMS.slot(settings.max_event_streams))
                response = await open_stream(state, state.read_sessions, settings, job_id, cursor)
            except ServiceError as exc:
                place.close()  # an answer that is no stream holds no place
                response = error_response(exc)
            except state.poll_reads.errors:  # no outage: the route meets it, and answers it
                response = None
            if response is not None:
                self.answered += 1
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)  # the place given back first: the route takes its own


def is_event_stream(route: Route, scope: Scope) -> bool:
    """Whether a request is for a job's event stream, by the route's own pattern and id type
    (on its path inside the app, as the router matches it): an answer that lasts as long as
    the job (the edge ends it at the client's end of data)."""
    return scope["method"] == "GET" and job_id_of(route, app_path(scope)) is not None


async def read_cursor(scope: Scope) -> Cursor | None:
    """Where the stream starts, read as the route reads it; None when the route must judge the
    request (an undeclared or repeated query parameter or id, an id it refuses)."""
    query = QUERY.read(scope.get("query_string", b""))
    if query is None or repeats_last_event_id(scope["headers"]):
        return None  # the route refuses a repeated id (single_last_event_id)
    given = header(scope, b"last-event-id")
    try:
        last_event_id = LAST_EVENT_ID.validate_python(
            None if given is None else given.decode("latin-1")
        )
        return await stream_start(last_event_id, query=query)
    except (ValidationError, InvalidInput):
        return None
