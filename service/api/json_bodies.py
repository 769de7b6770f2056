"""How a JSON body is read, by every route that takes one: as FastAPI reads it (Starlette's
``json.loads``: UTF-8, UTF-16 and UTF-32 alike), but an object that names a key twice is
refused rather than read as its last value (RFC 8259, section 4: such an object's meaning is
left to each reader, so a proxy that checks the first ``"epochs"`` and this service, which
would take the second, would read two different jobs).

The routes' own bodies are read through :class:`JsonBodyRoute` (each router with a JSON body
names it); ``POST /predict`` reads its own with :func:`read_json`. Both give FastAPI's
refusals: a syntax error is 422 ``json_invalid``, any other failure FastAPI's 400 "There was
an error parsing the body", which :func:`unreadable_body` puts in our words.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

UNPARSED_BODY = "There was an error parsing the body"  # FastAPI's words, explained below
KEY_SHOWN = 64  # the characters of a repeated key an answer repeats (a key may be megabytes)


class RepeatedKey(ValueError):
    """A JSON object names ``key`` twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"a JSON object names {key!r} twice")
        self.key = key


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    read = dict(pairs)
    if len(read) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen.add(key)
    return read


def loads(body: bytes) -> Any:
    """``body`` as JSON, every object's keys named once each."""
    return json.loads(body, object_pairs_hook=_once_each)


def read_json(body: bytes) -> Any:
    """``body`` read as a route's JSON body is, with its refusals: for a route that reads its
    own body (``POST /predict``), so that its refusals are the other routes' to the byte."""
    if not body:  # FastAPI reads none: a body its route requires is missing
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    try:
        return loads(body)
    except json.JSONDecodeError as exc:
        at = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([{**at, "input": {}, "ctx": {"error": exc.msg}}]) from exc
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, UNPARSED_BODY) from exc


def unreadable_body(exc: BaseException | None) -> str | None:
    """What FastAPI's "There was an error parsing the body" (a 400 for a JSON body that
    :func:`loads` fails on other than by syntax) was, in our words; None for any other 400."""
    if isinstance(exc, RepeatedKey):
        key = exc.key if len(exc.key) <= KEY_SHOWN else exc.key[:KEY_SHOWN] + "…"
        return f"the JSON body names {key!r} twice in one object"
    if isinstance(exc, UnicodeDecodeError):
        return "the JSON body is not UTF-8 text"
    if isinstance(exc, RecursionError):
        return "the JSON body nests too deeply to read"
    if isinstance(exc, ValueError) and "digits" in str(exc):
        return f"a number in the JSON body has more than {sys.get_int_max_str_digits()} digits"
    if isinstance(exc, ValueError):
        return "the body could not be read as JSON"
    return None


class JsonBodyRequest(Request):
    """Starlette's request, its JSON read by :func:`loads`."""

    async def json(self) -> Any:
        """The body as JSON, read once (as Starlette's), every key of an object named once."""
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JsonBodyRoute(APIRoute):
    """A FastAPI route whose JSON body is read by :func:`loads` (FastAPI's documented way to
    give a route its own request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, given the request as a :class:`JsonBodyRequest`."""
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return handle
