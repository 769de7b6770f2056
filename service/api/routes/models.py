"""Models: the versions (succeeded jobs), their weights, and the aliases that name them."""

from __future__ import annotations

from pathlib import Path as PathType
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, status
from fastapi.responses import FileResponse, Response

from service.api.deps import (
    JobIdPath,
    PageCursor,
    PageLimit,
    PredictorDep,
    SessionDep,
    SettingsDep,
    WriteSessionDep,
)
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

router = APIRouter(prefix="/models", tags=["models"])

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


@router.delete("/aliases/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
def delete_alias(name: AliasName, session: WriteSessionDep, predictor: PredictorDep) -> None:
    """Remove an alias. Without ``production``, predict falls back to the newest model."""
    model_registry.delete_alias(session, name)
    predictor.resolutions.clear()


@router.get("/{job_id}", response_model=ModelRead, responses=NOT_FOUND)
def get_model(job_id: JobIdPath, session: SessionDep, settings: SettingsDep) -> ModelRead:
    """One model."""
    return model_registry.get(session, settings.checkpoint_dir, job_id)


@router.get(
    "/{job_id}/checkpoint",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The weights.",
        },
        **NOT_FOUND,
        409: {"model": ErrorEnvelope, "description": "The weights are missing."},
    },
)
def download_checkpoint(job_id: JobIdPath, session: SessionDep, settings: SettingsDep) -> Response:
    """The model's weights: a PyTorch state_dict (``torch.load(..., weights_only=True)``).

    A file is streamed from the disk; weights stored in the database (a few hundred KB) are
    read by this route's thread, off the event loop, and sent in one body.
    """
    source = model_registry.existing_checkpoint(session, settings.checkpoint_dir, job_id)
    name = f"{job_id}.pt"
    if isinstance(source, PathType):
        return FileResponse(source, media_type="application/octet-stream", filename=name)
    return Response(
        source.getvalue(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
