"""Sweeps: start one (its trials are ordinary jobs), list, read, cancel, delete."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Path, Query, Response, status

from service.api.deps import (
    PageCursor,
    PageLimit,
    PredictorDep,
    SessionDep,
    SettingsDep,
    WriteSessionDep,
)
from service.api.json_bodies import JsonBodyRoute
from service.api.routes.jobs import forget_models
from service.clock import JOB_ID_PATTERN
from service.domain import sweeps
from service.schemas import ErrorEnvelope
from service.schemas.sweeps import SweepCreate, SweepList, SweepRead
from service.status import SweepStatus

router = APIRouter(prefix="/sweeps", tags=["sweeps"], route_class=JsonBodyRoute)

SweepIdPath = Annotated[
    str, Path(pattern=JOB_ID_PATTERN, description="A sweep id: 32 lowercase hex digits.")
]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorEnvelope, "description": "No sweep with this id."}
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepRead,
    responses={
        202: {
            "description": "Every trial queued.",
            "headers": {
                "Location": {
                    "description": "The sweep's URL, `/sweeps/{id}`.",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
        },
        422: {
            "model": ErrorEnvelope,
            "description": "A field or a trial's value is invalid, or there are more than "
            "MNIST_MAX_SWEEP_TRIALS trials, or a trial has over MNIST_MAX_JOB_STEPS steps.",
        },
        429: {
            "model": ErrorEnvelope,
            "description": "The queue (MNIST_MAX_QUEUED_JOBS) has no room for every trial.",
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
def create_sweep(
    spec: SweepCreate, session: WriteSessionDep, settings: SettingsDep, response: Response
) -> SweepRead:
    """Queue a grid or a random search over job parameters, one job per trial."""
    sweep = sweeps.create(
        session,
        spec,
        max_trials=settings.max_sweep_trials,
        max_attempts=settings.max_attempts,
        max_queued=settings.max_queued_jobs,
        max_steps=settings.max_job_steps,
    )
    response.headers["Location"] = f"/sweeps/{sweep.id}"
    return sweep


@router.get("", response_model=SweepList)
def list_sweeps(
    session: SessionDep,
    status_: Annotated[SweepStatus | None, Query(alias="status")] = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> SweepList:
    """Sweeps, newest first; pass ``next`` back as ``cursor`` for the following page."""
    return sweeps.list_page(session, status=status_, limit=limit, cursor=cursor)


@router.get("/{sweep_id}", response_model=SweepRead, responses=NOT_FOUND)
def get_sweep(sweep_id: SweepIdPath, session: SessionDep) -> SweepRead:
    """One sweep, every trial, and the best so far."""
    return sweeps.read(session, sweep_id)


@router.post(
    "/{sweep_id}/cancel",
    response_model=SweepRead,
    responses={**NOT_FOUND, 409: {"model": ErrorEnvelope, "description": "Already ended."}},
)
def cancel_sweep(sweep_id: SweepIdPath, session: WriteSessionDep) -> SweepRead:
    """Cancel its queued trials at once and its running ones within about a second."""
    return sweeps.cancel(session, sweep_id)


@router.delete(
    "/{sweep_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,  # no content, no Content-Type (FastAPI names JSON)
    responses={
        **NOT_FOUND,
        409: {
            "model": ErrorEnvelope,
            "description": "Running (cancel it first), or an alias points at one of its trials.",
        },
    },
)
async def delete_sweep(
    sweep_id: SweepIdPath, session: WriteSessionDep, settings: SettingsDep, predictor: PredictorDep
) -> None:
    """Delete an ended sweep with its trials (their steps, epochs and checkpoints)."""
    # The database and the files in a thread; the model cache (the event loop's) here.
    deleted = await anyio.to_thread.run_sync(
        sweeps.delete, session, settings.checkpoint_dir, sweep_id
    )
    forget_models(predictor, deleted)
