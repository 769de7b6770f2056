"""Models: the versions (succeeded jobs), their weights, and the aliases that name them."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Body, Path, status
from fastapi.responses import Response

from service.api.deps import (
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
from service.schemas import (
    ALIAS_PATTERN,
    AliasList,
    AliasRead,
    AliasWrite,
    ErrorEnvelope,
    ModelList,
    ModelRead,
)
from service.serving import registry as model_registry

router = APIRouter(prefix="/models", tags=["models"], route_class=JsonBodyRoute)

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorEnvelope, "description": "No such model or alias."}
}
AliasName = Annotated[
    str, Path(pattern=ALIAS_PATTERN, description="Letters, digits, `_.-`; at most 64.")
]


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep,
    settings: SettingsDep,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> ModelList:
    """Every succeeded job's model, most recently finished first; ``next`` pages on."""
    return model_registry.list_page(session, settings.checkpoint_dir, limit=limit, cursor=cursor)


# The alias routes come before /models/{job_id} so that "aliases" is never taken for an id.
@router.get("/aliases", response_model=AliasList)
def list_aliases(session: SessionDep) -> AliasList:
    """Every alias and the job it points at."""
    return model_registry.list_aliases(session)


@router.get("/aliases/{name}", response_model=AliasRead, responses=NOT_FOUND)
def get_alias(name: AliasName, session: SessionDep) -> AliasRead:
    """One alias."""
    return model_registry.get_alias(session, name)


@router.put(
    "/aliases/{name}",
    response_model=AliasRead,
    responses={
        **NOT_FOUND,
        409: {"model": ErrorEnvelope, "description": "The job has no trained model."},
    },
)
def put_alias(
    name: AliasName,
    body: Annotated[AliasWrite, Body()],
    session: WriteSessionDep,
    predictor: PredictorDep,
) -> AliasRead:
    """Point an alias (e.g. ``production``) at a model; it answers ``/predict?model=name``."""
    alias = model_registry.set_alias(session, name, body.job_id)
    predictor.resolutions.clear()  # committed: this process's predictions follow at once
    return alias


@router.delete(
    "/aliases/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,  # no content, no Content-Type (FastAPI names JSON)
    responses=NOT_FOUND,
)
def delete_alias(name: AliasName, session: WriteSessionDep, predictor: PredictorDep) -> None:
    """Remove an alias. Without ``production``, predict falls back to the newest model."""
    model_registry.delete_alias(session, name)
    predictor.resolutions.clear()


@router.get("/{job_id}", response_model=ModelRead, responses=NOT_FOUND)
def get_model(job_id: JobIdPath, session: SessionDep, settings: SettingsDep) -> ModelRead:
    """One model."""
    return model_registry.get(session, settings.checkpoint_dir, job_id)


CHECKPOINT_PATH = "/{job_id}/checkpoint"


@router.get(
    CHECKPOINT_PATH,
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The weights, whole (a `Range` header is ignored).",
        },
        **NOT_FOUND,
        409: {"model": ErrorEnvelope, "description": "The weights are missing or damaged."},
    },
)
async def download_checkpoint(
    job_id: JobIdPath, sessions: ReadSessionsDep, settings: SettingsDep
) -> Response:
    """The model's weights: a PyTorch state_dict (``torch.load(..., weights_only=True)``).

    Read and checked in a thread, in a session of its own that ends before the answer is sent
    (:func:`~service.serving.registry.checkpoint_bytes`): a file streamed from the disk after
    the route had returned needed the thread pool's threads, which routes waiting for the
    session's pool could all hold (a crowd of downloads stalled for the pool's 30 s timeout).
    """

    def read() -> bytes:
        with sessions() as session:
            return model_registry.checkpoint_bytes(session, settings.checkpoint_dir, job_id)

    return Response(
        await anyio.to_thread.run_sync(read),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{job_id}.pt"',
            "Accept-Ranges": "none",
        },
    )
