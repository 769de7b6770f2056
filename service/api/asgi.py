"""Plain ASGI plumbing the middlewares share: request ids, headers, error envelopes.

The middlewares (request id, API keys, body limits) are pure ASGI rather than Starlette's
``BaseHTTPMiddleware``: they see every message as it streams, never buffer a body, and work
for every route, including the ones other modules add later.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError

REQUEST_ID_HEADER = "x-request-id"
# A client's own id is kept only when it is short and plain, so it cannot forge log lines.
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_SCOPE_KEY = "mnist.request_id"
M = TypeVar("M", bound=BaseModel)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lowercase) in an HTTP scope, or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def query_names(model: type[BaseModel]) -> frozenset[str]:
    """The query parameters of a route that declares ``model`` as its query."""
    return frozenset(info.alias or name for name, info in model.model_fields.items())


class RouteQuery(Generic[M]):
    """Reads a query string as the route that declares ``model`` as its query reads it.

    A fast lane validates with the route's own model, so that the two cannot disagree on
    what a value means; it answers only what the route would take without a word.
    """

    def __init__(self, model: type[M]) -> None:
        self.model = model
        self.names = query_names(model)
        try:  # the commonest query of all, read once
            self.empty: M | None = model.model_validate({})
        except ValidationError:
            self.empty = None  # a parameter is required: the route refuses an empty query

    def read(self, query_string: bytes) -> M | None:
        """The parameters, or None when the route must judge the request itself: a name it
        does not declare or one given twice (:func:`service.api.deps.forbid_unknown_query`
        answers those), or a value the model refuses. Split as Starlette splits it."""
        if not query_string:
            return self.empty
        values: dict[str, str] = {}
        for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            if name not in self.names or name in values:
                return None
            values[name] = value
        try:
            return self.model.model_validate(values)
        except ValidationError:
            return None


def request_id(scope: Scope) -> str | None:
    """The id :class:`RequestIdMiddleware` gave this request."""
    value = scope.get(REQUEST_ID_SCOPE_KEY)
    return value if isinstance(value, str) else None


def error_response(error: ServiceError) -> JSONResponse:
    """The service's answer to ``error``, as FastAPI's handler for it gives it (a fast lane
    that meets the same error gives the same bytes)."""
    return JSONResponse(error.envelope(), status_code=error.status_code, headers=error.headers)


async def send_error(
    send: Send, error: ServiceError, *, close: bool = False, extra: dict[str, Any] | None = None
) -> None:
    """Answer with ``error`` in the service's envelope; ``close`` ends the connection after it.

    Closing matters when the request body was not read to its end: the connection cannot carry
    another request, and draining an unwanted upload would cost the bandwidth we refused.
    """
    envelope = error.envelope()
    if extra:
        envelope["error"].update(extra)
    body = json.dumps(envelope).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()),
    ]
    start = {"type": "http.response.start", "status": error.status_code, "headers": headers}
    await send(closing(start) if close else start)
    await send({"type": "http.response.body", "body": body})


def closing(start: Message) -> Message:
    """A response's start that ends the connection after it (any ``Connection`` it named
    replaced): for an answer given before the request's body was read to its end."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"connection"]
    return {**start, "headers": [*headers, (b"connection", b"close")]}


def json_headers(payload: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a 200 that carries ``payload``, a JSON document already encoded, in the
    order Starlette's responses give them (the routes': the same bytes either way)."""
    return [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]


async def send_json(send: Send, payload: bytes) -> None:
    """Answer 200 with ``payload``, a JSON document already encoded."""
    await send({"type": "http.response.start", "status": 200, "headers": json_headers(payload)})
    await send({"type": "http.response.body", "body": payload})


def assign_request_id(scope: Scope) -> str:
    """This request's id, kept in its scope: the client's own ``X-Request-ID`` when that is a
    plain token, else a fresh one."""
    given = header(scope, REQUEST_ID_HEADER.encode())
    candidate = given.decode("latin-1") if given is not None else ""
    rid = candidate if CLIENT_REQUEST_ID.match(candidate) else secrets.token_hex(16)
    scope[REQUEST_ID_SCOPE_KEY] = rid
    return rid


def with_request_id(headers: Iterable[tuple[bytes, bytes]], rid: str) -> list[tuple[bytes, bytes]]:
    """A response's headers, its ``X-Request-ID`` the request's id (and only that one)."""
    tagged = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
    tagged.append((REQUEST_ID_HEADER.encode(), rid.encode()))
    return tagged


class RequestIdMiddleware:
    """Gives every request an id and every response an ``X-Request-ID`` header.

    The id is the client's own ``X-Request-ID`` when that is a plain token, else a fresh one;
    the 500 handler logs it and returns it, so a user's report can be matched to the log.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Tag the scope, then every response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = assign_request_id(scope)

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_request_id(message.get("headers", ()), rid)
            await send(message)

        await self.app(scope, receive, tagged_send)


class HeadAsGet:
    """``HEAD`` wherever ``GET`` is answered (RFC 9110, section 9.3.2: the GET's status and
    headers, no body). FastAPI's routes answer HEAD only where one declares it, so most of the
    API answered 405. The GET's answer ends with its headers: an event stream's too (it sees
    its response complete, as when its client leaves), rather than run unseen to the job's end.

    The layers inside see a GET in a scope of their own (the server's scope must still say
    HEAD: uvicorn then writes no body and keeps the GET's ``Content-Length``); what they name
    the request by (its route) is handed out, for the metrics outside.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A HEAD as the GET, answered without its body; anything else passed on."""
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        inner = {**scope, "method": "GET"}
        ended = False

        def hand_out_route() -> None:
            scope.update({k: inner[k] for k in ("route", "endpoint") if k in inner})

        async def head_only(message: Message) -> None:
            nonlocal ended
            if ended or message["type"] != "http.response.start":
                return
            hand_out_route()  # the latency is observed at the start
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            ended = True

        await self.app(inner, receive, head_only)
        hand_out_route()  # the count at the call's end, whether an answer started or not
