"""Predict a digit from an uploaded image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from service import predict as predict_service
from service.clock import JOB_ID_PATTERN
from service.deps import ModelCacheDep, SessionDep, SettingsDep
from service.errors import PayloadTooLarge
from service.schemas import ErrorEnvelope, Prediction

router = APIRouter(tags=["predict"])


@router.post(
    "/predict",
    response_model=Prediction,
    responses={
        404: {"model": ErrorEnvelope, "description": "No job with this id."},
        409: {"model": ErrorEnvelope, "description": "No trained model (yet)."},
        413: {"model": ErrorEnvelope, "description": "The file or image is too large."},
        415: {"model": ErrorEnvelope, "description": "The file is not an image."},
        422: {"model": ErrorEnvelope, "description": "Empty, truncated or corrupt image."},
    },
)
async def predict(
    file: Annotated[UploadFile, File(description="An image: PNG, JPEG, BMP, GIF, WebP, …")],
    session: SessionDep,
    cache: ModelCacheDep,
    settings: SettingsDep,
    job_id: Annotated[
        str | None,
        Query(pattern=JOB_ID_PATTERN, description="Whose model; default the latest succeeded job."),
    ] = None,
) -> Prediction:
    """The digit in the image, its ten probabilities, and the job whose model answered."""
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the file is larger than {settings.max_upload_bytes} bytes")
    return await run_in_threadpool(predict_service.predict, session, cache, data, job_id)
