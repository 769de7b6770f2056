"""The fast lane of ``POST /predict``: one small image answered in plain ASGI.

Under load, FastAPI's routing, dependency injection, form parsing and thread hand-offs cost
several times more than a prediction itself. The lane serves the common request — one small
image as a raw ``image/*`` body or as a multipart form whose only part is the file ``file``,
with well-formed query parameters — without them: the image is decoded on the event loop
(it is small) and its forward pass is batched with the other requests of the same loop turn
(:mod:`service.serving.batching`).

The route (:mod:`service.api.routes.predict`) stays the reference. Whatever the lane does not
recognise goes to it untouched, and so does every request the lane cannot answer with a
prediction (an undecodable image, an unknown alias, no model yet): the lane replays the body
it read, and the route's answer, error or not, is the one the client gets. The lane can thus
only answer what the route would answer, only sooner.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.asgi import header, send_json, strict_query
from service.clock import JOB_ID_PATTERN
from service.errors import ServiceError
from service.schemas import ALIAS_PATTERN
from service.serving import predictor as predict_service
from service.serving.predictor import Predictor
from service.serving.registry import ModelChoice
from service.settings import Settings

PREDICT_PATH = "/predict"
# Bodies and images the lane takes on: decoding them on the event loop stays well under a
# millisecond. Larger ones go to the route, which decodes in the thread pool.
LANE_MAX_BODY_BYTES = 64 * 1024
LANE_MAX_PIXELS = 128 * 128
# python-multipart's bounds on part headers (MultipartParser): a part beyond them is the
# route's to judge.
MAX_PART_HEADERS = 8
MAX_PART_HEADER_BYTES = 4096
MAX_BOUNDARY_BYTES = 70  # RFC 2046

_QUERY_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "job_id": re.compile(JOB_ID_PATTERN),
    "model": re.compile(ALIAS_PATTERN),
    "top_k": re.compile(r"[1-9]|10"),  # 1 to NUM_CLASSES, written plainly
}


def query_choice(query_string: bytes) -> tuple[ModelChoice, int | None] | None:
    """The model choice and ``top_k`` of a well-formed query string, else None.

    Well-formed: only ``job_id``, ``model`` and ``top_k``, each at most once, each valid. The
    route answers every other query string (a 422 that names the parameter, or its own reading
    of a value the lane does not take, such as ``top_k=+3``).
    """
    values = strict_query(query_string, _QUERY_PATTERNS)
    if values is None:
        return None
    top_k = values.get("top_k")
    return (
        ModelChoice(job_id=values.get("job_id"), alias=values.get("model")),
        None if top_k is None else int(top_k),
    )


def single_file_part(body: bytes, boundary: bytes) -> bytes | None:
    """The data of a multipart body whose one and only part is a file named ``file``, else None.

    Strict on purpose: no preamble, plain ``Name: value`` part headers, the closing delimiter
    right after the file. Anything else is left to python-multipart, through the route.
    """
    opening = b"--" + boundary + b"\r\n"
    if not body.startswith(opening):
        return None
    head_end = body.find(b"\r\n\r\n", len(opening), len(opening) + MAX_PART_HEADER_BYTES)
    if head_end < 0:
        return None
    lines = body[len(opening) : head_end].split(b"\r\n")
    if len(lines) > MAX_PART_HEADERS:
        return None
    disposition = None
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return None
        if name.lower() == b"content-disposition":
            if disposition is not None:
                return None
            disposition = value.strip()
    if disposition is None:
        return None
    kind, params = parse_options_header(disposition)
    if kind != b"form-data" or params.get(b"name") != b"file" or b"filename" not in params:
        return None
    data_start = head_end + 4
    delimiter = b"\r\n--" + boundary
    data_end = body.find(delimiter, data_start)
    if data_end < 0:
        return None
    after = data_end + len(delimiter)
    if body[after : after + 2] != b"--":  # another part follows, or not a delimiter at all
        return None
    return body[data_start:data_end]


class PredictLane:
    """ASGI middleware: answers the common ``POST /predict`` itself (see the module docstring).

    Sits behind the request-id, metrics and API-key layers (they apply as to any route) and in
    front of FastAPI and its body limits, which see every request the lane passes on, replayed
    or not (``ServiceApp`` in :mod:`service.api.app`).
    """

    def __init__(self, app: ASGIApp, *, route: BaseRoute, settings: Settings) -> None:
        self.app = app
        self.route = route  # what the metrics middleware labels the lane's answers with
        self.raw_cap = min(LANE_MAX_BODY_BYTES, settings.max_upload_bytes)
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_pixels = min(LANE_MAX_PIXELS, settings.max_image_pixels)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the request here, or pass it on (with its body replayed if it was read)."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PREDICT_PATH:
            await self.app(scope, receive, send)
            return
        request = self._eligible(scope)
        if request is None:
            await self.app(scope, receive, send)
            return
        boundary, length, choice, top_k = request
        received: list[Message] = []
        body = await _read_body(receive, length, received)
        if body is not None:
            data = body if boundary is None else single_file_part(body, boundary)
            if data is not None and len(data) <= self.max_upload_bytes:
                answer = await self._predict(scope, data, choice, top_k)
                if answer is not None:
                    scope["route"] = self.route
                    await send_json(send, predict_service.json_bytes(answer))
                    return
        await self.app(scope, _replaying(received, receive), send)

    def _eligible(self, scope: Scope) -> tuple[bytes | None, int, ModelChoice, int | None] | None:
        """(multipart boundary or None for a raw body, its length, choice, top_k), or None."""
        declared = header(scope, b"content-length")
        content_type = header(scope, b"content-type")
        if declared is None or not declared.isdigit() or content_type is None:
            return None
        length = int(declared)
        kind, params = parse_options_header(content_type)
        if kind.startswith(b"image/"):
            boundary, cap = None, self.raw_cap
        elif kind == b"multipart/form-data":
            boundary, cap = params.get(b"boundary"), LANE_MAX_BODY_BYTES
            if not boundary or len(boundary) > MAX_BOUNDARY_BYTES:
                return None
        else:
            return None
        if length > cap:
            return None
        query = query_choice(scope.get("query_string", b""))
        if query is None:
            return None
        return boundary, length, *query

    async def _predict(
        self, scope: Scope, data: bytes, choice: ModelChoice, top_k: int | None
    ) -> dict[str, Any] | None:
        """The prediction, or None when the route must answer instead (its error is the one
        the client gets)."""
        predictor: Predictor = scope["app"].state.predictor
        try:
            x = predict_service.images_to_tensor([data], max_pixels=self.max_pixels)
            _, predictions = await predictor.predict(x, choice, top_k=top_k)
        except ServiceError:
            return None
        return predictions[0]


async def _read_body(receive: Receive, length: int, received: list[Message]) -> bytes | None:
    """The whole body (exactly ``length`` bytes), or None; every message read is kept."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None  # the client went away: the route hears of it too
        chunk: bytes = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > length:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks) if size == length else None


def _replaying(received: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the messages already read again, then the rest."""
    pending = list(received)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
