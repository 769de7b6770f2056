"""A job's live event stream (Server-Sent Events)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import sse
from service.api.deps import JobIdPath, ReadSessionsDep, SettingsDep
from service.domain import events
from service.schemas import ErrorEnvelope

# attempt:step:epoch, as the stream numbers its events; empty means "from the start".
EVENT_ID_PATTERN = r"^([0-9]{1,18}:[0-9]{1,18}:[0-9]{1,18})?$"

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {sse.MEDIA_TYPE: {}},
            "description": "`status`, `step` (batched) and `epoch` events; the last is a "
            '`status` with `"final": true`.',
        },
        404: {"model": ErrorEnvelope, "description": "No job with this id."},
        422: {"model": ErrorEnvelope, "description": "Last-Event-ID is not one this sent."},
    },
)
async def job_events(
    job_id: JobIdPath,
    sessions: ReadSessionsDep,
    settings: SettingsDep,
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
) -> StreamingResponse:
    """Follow a job as it trains: events as they are recorded, until the job has ended."""
    cursor = events.Cursor.parse(last_event_id or after)
    await run_in_threadpool(events.find_job, sessions, job_id)
    return StreamingResponse(
        events.stream(sessions, job_id, cursor, poll_s=settings.events_poll_s),
        media_type=sse.MEDIA_TYPE,
        # A proxy must neither store a live stream nor buffer it (X-Accel-Buffering: nginx).
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
