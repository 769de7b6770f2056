"""Jobs: submit, list, read, cancel, and their metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Body, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Send

from service.api.deps import (
    JobDep,
    JobForUpdateDep,
    JobIdPath,
    PageCursor,
    PageLimit,
    PredictorDep,
    ReadSessionsDep,
    SessionDep,
    SettingsDep,
    WriteSessionDep,
)
from service.api.json_bodies import JsonBodyRoute
from service.domain import deletion, jobs
from service.errors import NotFound
from service.schemas import (
    IN_DECIMAL_DIGITS,
    ErrorEnvelope,
    JobCreate,
    JobList,
    JobRead,
    MetricsRead,
)
from service.serving.predictor import Predictor
from service.status import JobStatus
from service.store.tables import MAX_INTEGER

log = logging.getLogger("service.api")
router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=JsonBodyRoute)

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorEnvelope, "description": "No job with this id."}
}
# A 60,000-image job of 10 epochs fits one page: a chart reads it in one request.
MAX_STEPS_PAGE = 100_000
DEFAULT_STEPS_PAGE = 1000
# Steps are numbered in an INTEGER column, 32 bits on PostgreSQL; a larger ``after_step`` names
# no step, and SQLite cannot even compare past 64 bits.
MAX_STEP = MAX_INTEGER


class MetricsQuery(BaseModel):
    """The query parameters of a metrics poll: the route declares them, and the polls' fast lane
    reads a query string with this same model (:mod:`service.api.lanes.polls`)."""

    after_step: Annotated[int, Field(ge=0, le=MAX_STEP), IN_DECIMAL_DIGITS] = Field(
        default=0, description="Only steps numbered above this."
    )
    limit: Annotated[int, Field(ge=1, le=MAX_STEPS_PAGE), IN_DECIMAL_DIGITS] = DEFAULT_STEPS_PAGE


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses={
        202: {
            "description": "Queued.",
            "headers": {
                "Location": {
                    "description": "The job's URL, `/jobs/{id}`.",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
        },
        422: {
            "model": ErrorEnvelope,
            "description": "A field is invalid, or the job has over MNIST_MAX_JOB_STEPS steps.",
        },
        429: {
            "model": ErrorEnvelope,
            "description": "MNIST_MAX_QUEUED_JOBS jobs are already waiting.",
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait.",
                    "required": True,
                    "schema": {"type": "integer"},
                }
            },
        },
    },
)
def submit_job(
    session: WriteSessionDep,
    settings: SettingsDep,
    response: Response,
    params: Annotated[JobCreate, Body()] = JobCreate(),  # noqa: B008 - an empty body means defaults
) -> JobRead:
    """Queue a training job; a worker picks it up. Poll ``Location`` or its metrics."""
    job = jobs.submit(
        session,
        params,
        max_attempts=settings.max_attempts,
        max_queued=settings.max_queued_jobs,
        max_steps=settings.max_job_steps,
    )
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> JobList:
    """Jobs, newest first; pass ``next`` back as ``cursor`` for the following page."""
    return jobs.list_page(session, status=status_, limit=limit, cursor=cursor)


@router.get("/{job_id}", response_model=JobRead, responses=NOT_FOUND)
def get_job(job: JobDep) -> JobRead:
    """One job."""
    return jobs.to_read(job)


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    responses={**NOT_FOUND, 409: {"model": ErrorEnvelope, "description": "Already ended."}},
)
def cancel_job(job: JobForUpdateDep, session: WriteSessionDep) -> JobRead:
    """Cancel: a queued job at once; a running one within about a second."""
    return jobs.cancel(session, job)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,  # no content, no Content-Type (FastAPI names JSON)
    responses={
        **NOT_FOUND,
        409: {
            "model": ErrorEnvelope,
            "description": "Queued or running (cancel it first), or an alias points at it.",
        },
    },
)
async def delete_job(
    job_id: JobIdPath, session: WriteSessionDep, settings: SettingsDep, predictor: PredictorDep
) -> None:
    """Delete an ended job with its steps, epochs and checkpoint files."""
    # The database and the files in a thread; the model cache (the event loop's) here.
    deleted = await anyio.to_thread.run_sync(
        deletion.delete_job_and_artifacts, session, settings.checkpoint_dir, job_id
    )
    forget_models(predictor, [deleted])


def forget_models(predictor: Predictor, deleted: Iterable[deletion.DeletedJob]) -> None:
    """Predict forgets deleted jobs' models at once in this process: their cached weights, and
    every remembered resolution (one of them may have been the default model)."""
    for job in deleted:
        if job.checkpoint is not None:
            predictor.models.evict(job.checkpoint)
    predictor.resolutions.clear()


@router.get("/{job_id}/metrics", response_model=MetricsRead, responses=NOT_FOUND)
def get_metrics(
    job: JobDep, session: SessionDep, query: Annotated[MetricsQuery, Query()]
) -> Response:
    """Every step's loss (paged by ``after_step``) and every epoch's accuracy."""
    # A plain def: FastAPI runs it in the thread pool, so a large page is read and encoded
    # off the event loop; the bytes go out as they are.
    body = jobs.metrics_json(session, job.id, after_step=query.after_step, limit=query.limit)
    if body is None:  # deleted since JobDep read it
        raise NotFound(f"no job with id {job.id}")
    return Response(body, media_type="application/json")


class _UnfinishedIfCutShort(StreamingResponse):
    """A stream whose body ends unfinished (no last chunk: the client sees it cut off) where
    the domain says the rest cannot be had (:class:`jobs.DownloadCutShort`): raised on, it
    was logged as a bug, and ended as if complete it would pass for the whole CSV."""

    async def stream_response(self, send: Send) -> None:
        """Starlette's, but for the cut."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.body_iterator:
                body = chunk.encode(self.charset) if isinstance(chunk, str) else bytes(chunk)
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except jobs.DownloadCutShort as exc:
            log.warning("a CSV download cut short: %s", exc)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@router.get(
    "/{job_id}/metrics.csv",
    response_class=Response,
    responses={
        200: {"content": {"text/csv": {}}, "description": "Every step, one row each."},
        **NOT_FOUND,
    },
)
def get_metrics_csv(job: JobDep, sessions: ReadSessionsDep) -> Response:
    """Every step's loss and every epoch's accuracy as CSV (a download: the dashboard links it),
    streamed a page at a time (its pieces are read in threads, as a plain iterator's are)."""
    pieces = jobs.metrics_csv(sessions, job.id)
    if pieces is None:  # deleted since JobDep read it
        raise NotFound(f"no job with id {job.id}")
    return _UnfinishedIfCutShort(
        pieces,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{job.id}-metrics.csv"'},
    )
