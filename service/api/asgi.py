"""Plain ASGI plumbing the middlewares share: request ids, headers, error envelopes.

The middlewares (request id, API keys, body limits) are pure ASGI rather than Starlette's
``BaseHTTPMiddleware``: they see every message as it streams, never buffer a body, and work
for every route, including the ones other modules add later.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError

REQUEST_ID_HEADER = "x-request-id"
# A client's own id is kept only when it is short and plain, so it cannot forge log lines.
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_SCOPE_KEY = "mnist.request_id"


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lowercase) in an HTTP scope, or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def strict_query(
    query_string: bytes, patterns: Mapping[str, re.Pattern[str]]
) -> dict[str, str] | None:
    """The parameters of a query string whose every name is in ``patterns``, given at most
    once, with a value its pattern matches in full; else None (a fast lane leaves such a
    request to its route, whose validation answers it)."""
    values: dict[str, str] = {}
    if not query_string:
        return values
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        pattern = patterns.get(name)
        if pattern is None or name in values or not pattern.fullmatch(value):
            return None
        values[name] = value
    return values


def request_id(scope: Scope) -> str | None:
    """The id :class:`RequestIdMiddleware` gave this request."""
    value = scope.get(REQUEST_ID_SCOPE_KEY)
    return value if isinstance(value, str) else None


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
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, payload: bytes) -> None:
    """Answer 200 with ``payload``, a JSON document already encoded."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


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
        given = header(scope, REQUEST_ID_HEADER.encode())
        candidate = given.decode("latin-1") if given is not None else ""
        rid = candidate if CLIENT_REQUEST_ID.match(candidate) else secrets.token_hex(16)
        scope[REQUEST_ID_SCOPE_KEY] = rid

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"
                ]
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, tagged_send)
