"""A job's live event stream: Server-Sent Events, written by FastAPI's EventSourceResponse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from service.api.deps import JobIdPath, ReadSessionsDep, SettingsDep
from service.api.openapi import error_response
from service.domain import events

# attempt:step:epoch, as the stream numbers its events; empty means "from the start". Nine
# digits each: more than any stream sends (a job has at most millions of steps), and every
# id the pattern admits fits the columns (2**31 - 1), so none is refused after validation.
EVENT_ID_PATTERN = r"^([0-9]{1,9}:[0-9]{1,9}:[0-9]{1,9})?$"

router = APIRouter(prefix="/jobs", tags=["jobs"])


async def stream_slot(settings: SettingsDep) -> AsyncIterator[None]:
    """One of the process's ``MNIST_MAX_EVENT_STREAMS`` places, held until the stream has ended
    (a dependency with ``yield`` exits after the response is sent); 503 when none is free.

    Async, so that the count is only ever touched in the event loop's thread. The first
    dependency of the route: a refused stream costs no database read.
    """
    with events.OPEN_STREAMS.slot(settings.max_event_streams):
        yield


async def stream_start(
    _slot: Annotated[None, Depends(stream_slot)],
    job_id: JobIdPath,
    sessions: ReadSessionsDep,
    last_event_id: Annotated[
        str | None,
        Header(
            pattern=EVENT_ID_PATTERN,
            description="Resume after this event (browsers send it).",
        ),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            alias="last_event_id",
            pattern=EVENT_ID_PATTERN,
            description="The same as the Last-Event-ID header, for clients that cannot set it.",
        ),
    ] = None,
) -> events.Cursor:
    """Where the stream starts; 422 for an id it did not send, 404 for an unknown job.

    A dependency, because a streaming route's own body runs only once the 200 has gone out:
    these answers must come before it.
    """
    if last_event_id:
        cursor = events.Cursor.parse(last_event_id)
    else:
        cursor = events.Cursor.parse(after, loc=("query", "last_event_id"))
    await run_in_threadpool(events.find_job, sessions, job_id)
    return cursor


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`status`, `step` (batched) and `epoch` events; the last is a "
            '`status` with `"final": true`.',
        },
        # Spelt out: a ``model`` here would be documented as the stream's media type.
        404: error_response("No job with this id."),
        422: error_response("Last-Event-ID is not one this sent."),
        503: error_response("As many streams are open as the server serves; see Retry-After."),
    },
)
async def job_events(
    request: Request,
    job_id: JobIdPath,
    sessions: ReadSessionsDep,
    settings: SettingsDep,
    cursor: Annotated[events.Cursor, Depends(stream_start)],
) -> AsyncIterator[ServerSentEvent]:
    """Follow a job as it trains: events as they are recorded, until the job has ended."""
    wake = request.app.state.wakeups
    stream = events.stream(sessions, job_id, cursor, poll_s=settings.events_poll_s, wake=wake)
    async for event in stream:
        yield event
