"""Answers the HTTP protocol gives itself, without an ASGI call: a job's polls on SQLite.

A chart polls for a job's new steps several times a second while the job trains on the same
cores, and each poll's CPU is taken from the training. On SQLite the polls' lane reads on the
event loop and keeps each answer until the database changes (:mod:`service.api.lanes.polls`),
so most polls cost no read at all; what is left is the request's way through the server: an
asyncio task, the ASGI layers (metrics, request id, API key, body limits, the lanes), each
wrapping ``send``, and two ASGI messages, about as much again as the read they followed
(docs/benchmarks.md, "a chart's polls answered by the protocol").

:class:`QuickAnswers` re-states none of the layers' rules: it asks each layer's own function
(the API key's :meth:`~service.api.security.ApiKeyMiddleware.refusal`, the body limits'
:meth:`~service.api.limits.BodyLimitMiddleware.refusal`, the request id's
:func:`~service.api.asgi.assign_request_id`, the metrics'
:meth:`~service.api.metrics.RequestMetricsMiddleware.answered`, the lane's
:meth:`~service.api.lanes.polls.PollLane.poll_of` and ``answer_now``) and answers only what all
of them let pass: anything else (a refused key, a body, a page too large for the loop, an unknown
job, a database error, an unexpected exception) goes the ASGI way as before, untouched. The
answer is sent through uvicorn's own ``RequestResponseCycle.send``, so its bytes, keep-alive and
access log are uvicorn's. ``MNIST_FAST_LANES=false`` turns it off with the lanes.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from starlette.types import Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from service.api.asgi import assign_request_id, json_headers, with_request_id
from service.api.lanes.polls import PollLane
from service.api.limits import BodyLimitMiddleware
from service.api.metrics import RequestMetricsMiddleware
from service.api.security import ApiKeyMiddleware

log = logging.getLogger("service.quick")

Headers = list[tuple[bytes, bytes]]
Sender = Callable[[Headers, bytes], None]  # sends a 200's headers and body
Front = Callable[[Scope, Sender], bool]
BODY_HEADERS = (b"content-length", b"transfer-encoding")


class QuickAnswers:
    """The answers a request gets without an ASGI call (see the module docstring)."""

    def __init__(
        self,
        state: Any,
        *,
        polls: PollLane,
        metrics: RequestMetricsMiddleware,
        keys: ApiKeyMiddleware | None,
        limits: BodyLimitMiddleware,
    ) -> None:
        self.state = state  # the app's, where the lifespan leaves the polls' reads
        self.polls = polls
        self.metrics = metrics
        self.keys = keys
        self.limits = limits

    def answer(
        self, scope: Scope, send: Sender, rewrite: Callable[[Scope], None] = lambda scope: None
    ) -> bool:
        """Answer this request with ``send`` if the layers and the lane let it be answered
        here; False: it goes its ASGI way. ``rewrite``: what the servers' own layers in front
        of the app do to a scope first (uvicorn's proxy headers)."""
        started = time.perf_counter()
        if scope["method"] != "GET" or _has_body(scope):
            return False
        rewrite(scope)
        reads = getattr(self.state, "poll_reads", None)
        if reads is None or not reads.on_event_loop:
            return False  # not started yet, or polls read in threads (not SQLite)
        # The poll first: a key in the query (``access_token``, cut from it by the key check)
        # is a parameter the poll does not declare, so such a request goes the ASGI way whole.
        poll = self.polls.poll_of(scope)
        if (
            poll is None
            or (self.keys is not None and self.keys.refusal(scope) is not None)
            or self.limits.refusal(scope) is not None
        ):
            return False
        body = self.polls.answer_now(reads, poll)
        if not isinstance(body, bytes):
            return False
        scope["route"] = poll.route
        send(with_request_id(json_headers(body), assign_request_id(scope)), body)
        self.metrics.answered(scope, 200, started)  # counted once sent, as the layer counts
        return True


def _has_body(scope: Scope) -> bool:
    """Whether the request declares a body: the lane reads none, but the body limits judge it
    as it arrives, and the ASGI way's cycle reads it."""
    return any(name in BODY_HEADERS and value != b"0" for name, value in scope.get("headers", ()))


def behind_proxies(app: Any) -> tuple[list[Any], Any]:
    """uvicorn's proxy headers' layers in front of its app ``app``, outermost first, and the
    app behind them: the service's."""
    proxies: list[Any] = []
    while isinstance(app, ProxyHeadersMiddleware):
        proxies.append(app)
        app = app.app
    return proxies, app


def service_hooks(app: Any) -> tuple[Any, Any]:
    """What the edge protocol asks of the service's app behind uvicorn's layers (None for
    another app): whether a scope is an event stream's, and the metrics that count refusals."""
    _, service = behind_proxies(app)
    metrics = getattr(getattr(service, "state", None), "metrics", None)
    return getattr(service, "is_event_stream", None), metrics


def front_of(app: Any) -> Front | None:
    """How uvicorn's app ``app`` answers a request at once, or None where it cannot: the app's
    :class:`QuickAnswers` behind uvicorn's proxy headers, which rewrite the scope's client and
    scheme first, as they would on the ASGI way."""
    proxies, app = behind_proxies(app)
    rewrites: list[Any] = []
    for proxy in proxies:
        alone: Any = copy.copy(proxy)
        alone.app = _no_app  # its rewrite of the scope, and nothing after
        rewrites.append(alone)
    quick = getattr(app, "quick", None)
    if not isinstance(quick, QuickAnswers):
        return None

    def rewrite(scope: Scope) -> None:
        for proxy in rewrites:
            run_now(proxy(scope, _no_receive, _no_send))

    def front(scope: Scope, send: Sender) -> bool:
        return quick.answer(scope, send, rewrite)

    return front


def send_whole(
    cycle: RequestResponseCycle, transport: asyncio.Transport, headers: Headers, body: bytes
) -> None:
    """Send a 200 of ``headers`` and ``body`` through uvicorn's ``cycle``, here, as the app's
    task would have (its bytes, keep-alive and access log are uvicorn's), in one write to
    ``transport``: the cycle writes the head and the body apart, two system calls, each waking
    the client. Call it only while writes are not paused (``send`` then never waits)."""
    gathered = _Gathered(transport)
    respond = cycle.on_response  # the protocol's next step: it may answer a pipelined request

    def in_order() -> None:
        gathered.flush()
        respond()

    cycle.transport, cycle.on_response = cast(asyncio.Transport, gathered), in_order
    try:
        run_now(cycle.send({"type": "http.response.start", "status": 200, "headers": headers}))
        run_now(cycle.send({"type": "http.response.body", "body": body}))
    except BaseException:
        gathered.parts.clear()  # half an answer is none: the caller closes the connection
        raise
    finally:
        cycle.transport = transport


class _Gathered:
    """A transport that keeps what is written until :meth:`flush` writes it at once."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        if self.parts:
            self.transport.write(b"".join(self.parts))
            self.parts.clear()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def run_now(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run to its end, here, a coroutine that never waits (uvicorn's ``send`` while writes are
    not paused, the proxy headers' rewrite); a coroutine that waits is an error."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError(f"{coroutine!r} waited")


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:
    return None


async def _no_receive() -> Any:
    raise RuntimeError("a quick answer reads no body")


async def _no_send(message: Any) -> None:
    raise RuntimeError("a quick answer is sent by the protocol")
