"""Predict digits: multipart ``file`` or ``files``, a raw ``image/*`` body, or JSON pixels."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.api.deps import PredictorDep, SettingsDep
from service.api.json_bodies import read_json
from service.clock import JOB_ID_PATTERN
from service.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.ml import NUM_CLASSES
from service.schemas import (
    ALIAS_PATTERN,
    IN_DECIMAL_DIGITS,
    ErrorEnvelope,
    PixelsInput,
    Prediction,
    PredictionBatch,
)
from service.serving import predictor as predict_service
from service.serving.registry import ModelChoice
from service.settings import Settings

router = APIRouter(tags=["predict"])

JSON_MAX_BYTES = 256 * 1024  # 784 numbers with generous formatting fit in a few tens of KiB
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers on top of the images
MAX_FORM_FIELDS = 8  # non-file form fields: none are expected
HOW_TO_SEND = (
    "send a multipart `file` (one image) or `files` (several), a raw body with an image/* "
    'content type, or JSON {"pixels": 28×28 numbers 0–255}'
)

_binary = {"type": "string", "format": "binary"}
# The bodies predict reads itself, described by hand; named (components of the document,
# added by :func:`service.api.openapi.complete`) so that a generated client has a class of
# that name for each, not one named after the operation and the media type.
NAMED_SCHEMAS: dict[str, Any] = {
    "PredictForm": {
        "type": "object",
        "title": "PredictForm",
        "description": "Exactly one of `file` and `files`, nothing else.",
        "properties": {
            "file": {**_binary, "description": "One image."},
            "files": {
                "type": "array",
                "items": _binary,
                "minItems": 1,  # no part at all is an empty form
                "description": "Several images: one prediction each, in order.",
            },
        },
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
    },
    "PixelsInput": PixelsInput.model_json_schema(ref_template="#/components/schemas/{model}"),
}
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/PredictForm"}},
            "image/*": {"schema": _binary},
            "application/json": {"schema": {"$ref": "#/components/schemas/PixelsInput"}},
        },
    }
}


class PredictQuery(BaseModel):
    """Predict's query parameters: the route declares them, and the fast lane reads a query
    string with this same model (:mod:`service.api.lanes.predict`), so both take the same."""

    job_id: str | None = Field(
        default=None, pattern=JOB_ID_PATTERN, description="The model of this job."
    )
    model: str | None = Field(
        default=None, pattern=ALIAS_PATTERN, description="The model this alias points at."
    )
    top_k: Annotated[int, Field(ge=1, le=NUM_CLASSES), IN_DECIMAL_DIGITS] | None = Field(
        default=None, description="Also list the k best digits."
    )


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value, as predict tells its inputs apart by it."""
    return content_type.split(";")[0].strip().lower()


def is_json(kind: str) -> bool:
    """Whether a media type (:func:`media_type`) is JSON's: ``application/json`` or ``…+json``."""
    return kind == "application/json" or kind.endswith("+json")


def multipart_cap(settings: Settings) -> int:
    """The most bytes a multipart request may carry: every image it may hold, and framing."""
    return settings.max_upload_bytes * settings.max_images_per_request + MULTIPART_OVERHEAD_BYTES


@router.post(
    "/predict",
    response_model=Prediction | PredictionBatch,
    response_model_exclude_none=True,
    openapi_extra=REQUEST_BODY,
    responses={
        404: {"model": ErrorEnvelope, "description": "No such job or alias."},
        409: {"model": ErrorEnvelope, "description": "No trained model (yet)."},
        413: {
            "model": ErrorEnvelope,
            "description": "Too many bytes, pixels, JPEG scans or images.",
        },
        415: {"model": ErrorEnvelope, "description": "Not an image in an accepted format."},
        422: {"model": ErrorEnvelope, "description": "Empty, corrupt or invalid input."},
        429: {
            "model": ErrorEnvelope,
            "description": "Too many requests already wait to decode their images.",
        },
    },
)
async def predict(
    request: Request,
    predictor: PredictorDep,
    settings: SettingsDep,
    query: Annotated[PredictQuery, Query()],
) -> Response:
    """The digit in each image, its ten probabilities, and the job whose model answered.

    Images (PNG, JPEG, BMP, GIF, WebP) are brought to MNIST's layout first: grayscale on
    white, inverted when the background is light, the ink's box scaled to 20 px and centred
    by mass in 28×28. The model is ``job_id``'s, or ``model``'s (an alias); with neither, the
    ``production`` alias's, else the most recently finished succeeded job's. Given both,
    they must name the same model (409 otherwise).
    """
    choice = ModelChoice(job_id=query.job_id, alias=query.model)
    kind, payload = await _read_input(request, settings)

    if isinstance(payload, PixelsInput):
        x = await run_in_threadpool(predict_service.pixels_to_tensor, payload.pixels)
    else:
        # Decoding may be slow (a large photo): off the loop, in one of the decode slots.
        x = await predictor.images_tensor(
            payload, max_pixels=settings.max_image_pixels, named=kind == "files"
        )
    # The model answers on the loop, batched.
    answering, predictions = await predictor.predict(x, choice, top_k=query.top_k)
    body = {"job_id": answering, "predictions": predictions} if kind == "files" else predictions[0]
    # Built to the Prediction/PredictionBatch schema directly: validating our own output
    # again per request would cost more than the prediction.
    return Response(predict_service.json_bytes(body), media_type="application/json")


async def _read_input(
    request: Request, settings: Settings
) -> tuple[str, list[bytes] | PixelsInput]:
    """What the client sent: ("file" | "files" | "body", images) or ("pixels", PixelsInput)."""
    content_type = media_type(request.headers.get("content-type", ""))
    if content_type == "multipart/form-data":
        return await _read_multipart(request, settings)
    if content_type.startswith("image/"):
        return "body", [await _read_body(request, settings.max_upload_bytes, "the image")]
    if is_json(content_type):
        return "pixels", _parse_pixels(await _read_body(request, JSON_MAX_BYTES, "the JSON body"))
    if content_type == "application/x-www-form-urlencoded":
        raise InvalidInput(f"the form has no image file: {HOW_TO_SEND}")
    if not content_type and not await _read_body(request, JSON_MAX_BYTES, "the body"):
        raise InvalidInput(f"the request is empty: {HOW_TO_SEND}")
    raise UnsupportedMediaType(
        f"cannot read a {content_type or 'body without a content type'}: {HOW_TO_SEND}; "
        f"accepted image formats: {predict_service.ACCEPTED_FORMATS_TEXT}"
    )


def _declared_over(request: Request, cap: int) -> bool:
    declared = request.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > cap


async def _capped(request: Request, cap: int, what: str) -> AsyncGenerator[bytes, None]:
    """The body's chunks, refusing (413) past ``cap`` bytes without reading the rest."""
    if _declared_over(request, cap):
        raise PayloadTooLarge(f"{what} is larger than {cap} bytes")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise PayloadTooLarge(f"{what} is larger than {cap} bytes")
            yield chunk
    except ClientDisconnect as exc:  # the client's doing, not a fault: no 500, no traceback
        raise BadRequest(f"the client left before {what} had been sent") from exc


async def _read_body(request: Request, cap: int, what: str) -> bytes:
    return b"".join([chunk async for chunk in _capped(request, cap, what)])


def _parse_pixels(body: bytes) -> PixelsInput:
    pixels = read_json(body)  # as every route's JSON body is read, refusals and all
    try:
        return PixelsInput.model_validate(pixels)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from exc


async def _read_multipart(
    request: Request, settings: Settings
) -> tuple[str, list[bytes] | PixelsInput]:
    limit = settings.max_images_per_request
    parser = MultiPartParser(
        request.headers,
        _capped(request, multipart_cap(settings), "the request"),
        max_files=limit,
        max_fields=MAX_FORM_FIELDS,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # told in our words, not Starlette's (README, Security)
        if exc.message.startswith("Too many files"):
            raise PayloadTooLarge(f"too many images: at most {limit} per request") from exc
        if exc.message.startswith("Too many fields"):
            raise InvalidInput(f"the form has more than {MAX_FORM_FIELDS} text fields") from exc
        if exc.message.startswith(("Field exceeded", "Part exceeded")):
            raise PayloadTooLarge(f"a text field of the form is too long: {HOW_TO_SEND}") from exc
        if exc.message.startswith("Missing boundary"):
            raise InvalidInput("the multipart content type names no boundary") from exc
        raise InvalidInput("the multipart body is malformed") from exc
    try:
        fields = form.multi_items()
        unexpected = sorted({name for name, _ in fields if name not in ("file", "files")})
        if unexpected:
            raise InvalidInput(f"unexpected form field {unexpected[0]!r}: {HOW_TO_SEND}")
        names = {name for name, _ in fields}
        if not names:
            raise InvalidInput(f"the form has no image file: {HOW_TO_SEND}")
        if len(names) == 2:
            raise InvalidInput("send `file` (one image) or `files` (several), not both")
        (kind,) = names
        uploads = [value for _, value in fields]
        if kind == "file" and len(uploads) > 1:
            raise InvalidInput("`file` takes one image; send several as `files`")
        images = []
        for i, upload in enumerate(uploads):
            where = "file" if kind == "file" else f"files[{i}]"
            if not isinstance(upload, UploadFile):
                raise InvalidInput(f"{where} is a text field, not an uploaded file")
            if upload.size is not None and upload.size > settings.max_upload_bytes:
                raise PayloadTooLarge(f"{where} is larger than {settings.max_upload_bytes} bytes")
            images.append(await upload.read())
        return kind, images
    finally:
        await form.close()
