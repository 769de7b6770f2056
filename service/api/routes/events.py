"""A job's live event stream: Server-Sent Events.

The events are FastAPI's :class:`ServerSentEvent`, written in its wire format
(``format_sse_event``), but not by its ``EventSourceResponse`` route: that one's keep-alive
is a comment *and a blank line*, and a blank line after an id makes httpx-sse dispatch an
event with empty data (its issue #35; ``json.loads`` then fails). Here a keep-alive is the
comment line alone, which every client ignores, and a reconnection after the final event gets
204, which a generator route cannot answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Annotated, Any

from cachetools import TTLCache
from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from fastapi.sse import ServerSentEvent, format_sse_event
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import State
from starlette.types import Send

from service.api.deps import JobIdPath, ReadSessionsDep, SettingsDep
from service.api.openapi import error_response
from service.domain import event_reads, events, stream_slots
from service.errors import InvalidInput
from service.settings import Settings

if TYPE_CHECKING:
    from service.api.lanes.polls import PollReads

router = APIRouter(prefix="/jobs", tags=["jobs"])

MEDIA_TYPE = "text/event-stream"
RETRY_MS = 1000  # how long a browser waits before reconnecting
# Written batches are kept this long, this many at most (:class:`Chunks`): as long as the
# shared reads they are made from.
KEPT_S, KEPT_CHUNKS = event_reads.KEPT_S, 256
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffers it
# One event as OpenAPI 3.2 describes a stream's items (as FastAPI documents its own streams).
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["status", "step", "epoch"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": events.EVENT_ID_PATTERN},
        "retry": {"type": "integer", "minimum": 0},
    },
    "required": ["event", "data", "id"],
}


async def stream_slot(settings: SettingsDep) -> AsyncIterator[None]:
    """One of the process's ``MNIST_MAX_EVENT_STREAMS`` places, held until the stream has ended
    (a dependency with ``yield`` exits after the response is sent); 503 when none is free.

    Async, so that the count is only ever touched in the event loop's thread. The first
    dependency of the route: a refused stream costs no database read.
    """
    with stream_slots.OPEN_STREAMS.slot(settings.max_event_streams):
        yield


# The stream's start as a client gives it: the route declares these, and the streams' fast
# lane (service/api/lanes/streams.py) reads a request with these same types.
LastEventIdHeader = Annotated[
    str | None,
    Header(
        pattern=events.EVENT_ID_PATTERN,
        description="Resume after this event (browsers send it).",
    ),
]


class EventsQuery(BaseModel):
    """The query of a stream's request."""

    last_event_id: str | None = Field(
        default=None,
        pattern=events.EVENT_ID_PATTERN,
        description="The same as the Last-Event-ID header, for clients that cannot set it.",
    )


def repeats_last_event_id(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's raw headers give ``Last-Event-ID`` more than once."""
    return sum(name == b"last-event-id" for name, _ in headers) > 1


async def single_last_event_id(request: Request) -> None:
    """422 for a ``Last-Event-ID`` given more than once (which one counted was a matter of
    position), as for a query parameter given twice. The streams' lane leaves such a request
    to the route. Async: it only reads headers (no thread hand-off)."""
    if repeats_last_event_id(request.headers.raw):
        raise InvalidInput(
            "header 'Last-Event-ID' is given more than once",
            details=[{"loc": ["header", "last-event-id"], "msg": "given more than once"}],
        )


async def stream_start(
    last_event_id: LastEventIdHeader = None, *, query: Annotated[EventsQuery, Query()]
) -> events.Cursor:
    """Where the stream starts; 422 for an id it did not send. Async: it only parses."""
    if last_event_id:
        return events.Cursor.parse(last_event_id)
    return events.Cursor.parse(query.last_event_id, loc=("query", "last_event_id"))


def encode(event: ServerSentEvent) -> bytes:
    """An event in the text/event-stream format. An event without data (the keep-alive) is
    written without the blank line that would dispatch it: its comment lines alone."""
    block = format_sse_event(
        data_str=event.raw_data,
        event=event.event,
        id=event.id,
        retry=event.retry,
        comment=event.comment,
    )
    return block if event.raw_data is not None else block[:-1]


class LastChunk(bytes):
    """The body's last chunk: the batch that ends with the stream's final event."""


def written(batch: list[ServerSentEvent], *, retry: int | None = None) -> bytes:
    """A batch in the text/event-stream format (``retry`` on its first event), a
    :class:`LastChunk` when it ends with the final event."""
    if retry is not None:
        first = batch[0].model_copy(update={"retry": retry})
        chunk = b"".join(encode(event) for event in (first, *batch[1:]))
    else:
        chunk = b"".join(encode(event) for event in batch)
    return LastChunk(chunk) if events.is_final(batch[-1]) else chunk


class Chunks:
    """Each batch of events written out once, for every stream that sends it.

    A job's streams that stood alike are handed the same batch (the same list of the same
    events, never changed: :class:`~service.domain.event_reads.SharedReads`, on the event loop),
    and a crowd of them wrote it out once each: about a tenth of what a crowd's streams cost
    the API (docs/benchmarks.md). A chunk is kept with its batch, so the batch lives as long as the
    chunk, and its id cannot name another batch meanwhile; for :data:`KEPT_S`, as the shared
    reads are. The event loop's alone (no lock).
    """

    def __init__(self, kept: int = KEPT_CHUNKS, kept_s: float = KEPT_S) -> None:
        self._made: TTLCache[tuple[int, int | None], tuple[list[ServerSentEvent], bytes]] = (
            TTLCache(kept, kept_s)
        )

    def of(self, batch: list[ServerSentEvent], *, retry: int | None = None) -> bytes:
        """:func:`written`, made once for this batch (and this ``retry``)."""
        key = (id(batch), retry)
        made = self._made.get(key)
        if made is not None and made[0] is batch:
            return made[1]
        chunk = written(batch, retry=retry)
        self._made[key] = (batch, chunk)
        return chunk


CHUNKS = Chunks()  # one per process


async def wire(
    batches: AsyncIterator[list[ServerSentEvent]], chunks: Chunks | None = None
) -> AsyncIterator[bytes]:
    """Each batch of events (a poll's) in the text/event-stream format, written at once; the
    one ending with the final event as a :class:`LastChunk`. Through ``chunks`` where a job's
    streams share their batches (a keep-alive, each stream's own, never). The reconnection
    delay rides on the first event: a block of ``retry`` alone reaches some clients
    (httpx-sse) as an event with empty data, and a keep-alive carries none."""
    retry: int | None = RETRY_MS
    async for batch in batches:
        if batch[0].raw_data is None:
            yield written(batch)
            continue
        opening, retry = retry, None
        yield written(batch, retry=opening) if chunks is None else chunks.of(batch, retry=opening)


class EventStreamResponse(StreamingResponse):
    """Starlette's streaming response, but a :class:`LastChunk` ends the body in its own
    message. uvicorn writes each body message to the socket at once, so the final event and
    the chunked body's end go out in one write, and wake the client once, not twice."""

    async def stream_response(self, send: Send) -> None:
        """The response, one write per chunk."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        ended = False
        async for chunk in self.body_iterator:
            if ended:  # batches() ends with the final event: this is a bug
                raise RuntimeError("the event stream went on after its final event")
            ended = isinstance(chunk, LastChunk)
            body = chunk.encode(self.charset) if isinstance(chunk, str) else bytes(chunk)
            await send({"type": "http.response.body", "body": body, "more_body": not ended})
        if not ended:  # the stream ended without its final event (the job was deleted)
            await send({"type": "http.response.body", "body": b"", "more_body": False})


@router.get(
    "/{job_id}/events",
    response_class=EventStreamResponse,
    responses={
        200: {
            "description": "`status`, `step` (batched) and `epoch` events; the last is a "
            '`status` with `"final": true`, its id ending in `:end`.',
            "content": {MEDIA_TYPE: {"itemSchema": EVENT_SCHEMA}},
        },
        204: {
            "description": "The stream has ended: Last-Event-ID is its final event's (a "
            "browser's EventSource stops reconnecting)."
        },
        # Spelt out: a ``model`` here would be documented as the stream's media type.
        404: error_response("No job with this id."),
        422: error_response("Last-Event-ID is not one this sent."),
        503: error_response("As many streams are open as the server serves; see Retry-After."),
    },
)
async def job_events(
    request: Request,
    _slot: Annotated[None, Depends(stream_slot)],
    job_id: JobIdPath,
    sessions: ReadSessionsDep,
    settings: SettingsDep,
    _once: Annotated[None, Depends(single_last_event_id)],
    cursor: Annotated[events.Cursor, Depends(stream_start)],
) -> Response:
    """Follow a job as it trains: events as they are recorded, until the job has ended."""
    return await open_stream(request.app.state, sessions, settings, job_id, cursor)


async def open_stream(
    state: State,
    sessions: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    cursor: events.Cursor,
) -> Response:
    """The answer to a stream's request that holds one of the process's places (the route's,
    and the streams' fast lane's): 204 when the stream has ended, else the stream itself. The
    service's errors are raised, for the caller to answer: :class:`~service.errors.NotFound`
    for an unknown job, and what :func:`~service.store.availability.unavailable_as_503` makes
    of an outage."""
    poll_reads: PollReads = state.poll_reads
    reads = poll_reads.for_streams(sessions)
    job = await events.opening_row(reads, job_id)
    if events.has_ended(job, cursor):
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    stream = events.batches(
        reads,
        job_id,
        cursor,
        poll_s=settings.events_poll_s,
        wake=state.wakeups,
        shared=state.shared_reads,
        opened=job,
    )
    # Only reads on the event loop are shared (SharedReads): a stream's own batches are
    # written out as they come.
    chunks = CHUNKS if reads.loop_steps is not None else None
    return EventStreamResponse(wire(stream, chunks), media_type=MEDIA_TYPE, headers=STREAM_HEADERS)
