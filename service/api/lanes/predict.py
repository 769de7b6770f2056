"""The fast lane of ``POST /predict``: one small image answered in plain ASGI.

Under load, FastAPI's routing, dependency injection, form parsing and thread hand-offs cost
several times more than a prediction itself. The lane serves the common request — one small
image as a raw ``image/*`` body or as a multipart form whose only part is the file ``file``,
with query parameters the route takes — without them: the image is decoded on the event loop
(it is small; in a decode slot all the same, as every decode is) and its forward pass is
batched with the other requests of the same loop turn (:mod:`service.serving.batching`).

The route (:mod:`service.api.routes.predict`) stays the reference, and the lane re-states none
of its rules: it reads the query with the route's own model (``PredictQuery``), tells inputs
apart by the route's ``media_type`` and takes a form's parts from the body limits' guard, the
same python-multipart parse that Starlette's parser makes of the same bytes for the route. The
body limits stand in front of the lane, so it never reads a body they have not seen. Whatever
the lane does not recognise goes to the route untouched, and so does every request the lane
cannot answer with a prediction (an undecodable image, an unknown alias, no model yet): the
lane replays the body it read, and the route's answer, error or not, is the one the client gets.
The lane can thus only answer what the route would answer, only sooner.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.asgi import RouteQuery, header, send_json
from service.api.limits import MultipartGuard, guard_of
from service.api.routes.predict import PredictQuery, media_type, multipart_cap
from service.errors import ServiceError
from service.serving import predictor as predict_service
from service.serving.predictor import Predictor
from service.serving.registry import ModelChoice
from service.settings import Settings

PREDICT_PATH = "/predict"
# Bodies and images the lane takes on: decoding them on the event loop stays well under a
# millisecond. Larger ones go to the route, which decodes in the thread pool.
LANE_MAX_BODY_BYTES = 64 * 1024
LANE_MAX_PIXELS = 128 * 128

QUERY = RouteQuery(PredictQuery)


def file_part(guard: MultipartGuard) -> bytes | None:
    """The image of a form whose one and only part is a file named ``file``, else None.

    Read from what the guard kept of the form (:meth:`MultipartGuard.collect`): the route gets
    exactly these bytes from Starlette's parser, and takes them without a word about the form.
    A declared charset changes how Starlette decodes the part's name: the route judges those.
    """
    parts = guard.collected
    if not guard.ended or parts is None or len(parts) != 1 or guard.charset is not None:
        return None
    disposition = parts[0].disposition
    if disposition is None or disposition.get(b"name") != b"file" or b"filename" not in disposition:
        return None
    return b"".join(parts[0].chunks)


class PredictLane:
    """ASGI middleware: answers the common ``POST /predict`` itself (see the module docstring).

    Sits behind the request-id, metrics, API-key and body-limit layers (they apply as to any
    route) and in front of FastAPI, which sees every request the lane passes on, replayed or
    not (``ServiceApp`` in :mod:`service.api.app`).
    """

    def __init__(self, app: ASGIApp, *, route: BaseRoute, settings: Settings) -> None:
        self.app = app
        self.route = route  # what the metrics middleware labels the lane's answers with
        self.raw_cap = min(LANE_MAX_BODY_BYTES, settings.max_upload_bytes)
        self.form_cap = min(LANE_MAX_BODY_BYTES, multipart_cap(settings))
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
        guard, length, query = request
        scope["route"] = self.route  # a refusal of the body is labelled as the route's would be
        received: list[Message] = []
        # A body the limits refuse ends here: their error is the answer, as for the route.
        chunks = await _read_body(receive, length, received)
        if chunks is not None:
            data = b"".join(chunks) if guard is None else file_part(guard)
            if data is not None and len(data) <= self.max_upload_bytes:
                answer = await self._predict(scope, data, query)
                if answer is not None:
                    await send_json(send, predict_service.json_bytes(answer))
                    return
        await self.app(scope, _replaying(received, receive), send)

    def _eligible(self, scope: Scope) -> tuple[MultipartGuard | None, int, PredictQuery] | None:
        """(the form's guard, or None for a raw image; the body's length; the query), or None
        for a request the lane leaves to the route."""
        declared = header(scope, b"content-length")
        if declared is None or not declared.isdigit():
            return None
        kind = media_type((header(scope, b"content-type") or b"").decode("latin-1"))
        guard: MultipartGuard | None = None
        if kind.startswith("image/"):
            cap = self.raw_cap
        elif kind == "multipart/form-data":
            guard, cap = guard_of(scope), self.form_cap
            if guard is None:  # no usable boundary: the route says what is wrong
                return None
        else:
            return None
        length = int(declared)
        if length > cap:
            return None
        query = QUERY.read(scope.get("query_string", b""))
        if query is None:
            return None
        if guard is not None:
            guard.collect(length)
        return guard, length, query

    async def _predict(
        self, scope: Scope, data: bytes, query: PredictQuery
    ) -> dict[str, Any] | None:
        """The prediction, or None when the route must answer instead (its error is the one
        the client gets)."""
        predictor: Predictor = scope["app"].state.predictor
        choice = ModelChoice(job_id=query.job_id, alias=query.model)
        try:
            x = await predictor.images_tensor([data], max_pixels=self.max_pixels, inline=True)
            _, predictions = await predictor.predict(x, choice, top_k=query.top_k)
        except ServiceError:
            return None
        return predictions[0]


async def _read_body(receive: Receive, length: int, received: list[Message]) -> list[bytes] | None:
    """The whole body's chunks (exactly ``length`` bytes), or None; every message read is kept."""
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
            return chunks if size == length else None


def _replaying(received: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the messages already read again, then the rest."""
    pending = list(received)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
