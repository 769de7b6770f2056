"""The FastAPI application: ``create_app()`` wires settings, database, routes and errors."""

from __future__ import annotations

import functools
import gc
import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import fastapi.routing
import psycopg
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import openapi
from service.api.asgi import (
    REQUEST_ID_HEADER,
    HeadAsGet,
    RequestIdMiddleware,
    error_response,
    request_id,
)
from service.api.deps import forbid_unknown_query
from service.api.edge.quick import QuickAnswers
from service.api.json_bodies import unreadable_body
from service.api.lanes.polls import PollLane, PollReads
from service.api.lanes.predict import PREDICT_PATH, PredictLane
from service.api.lanes.streams import StreamLane, is_event_stream
from service.api.limits import BodyLimitMiddleware
from service.api.metrics import RequestMetricsMiddleware, ServiceMetrics
from service.api.routes import (
    dashboard,
    events,
    health,
    jobs,
    models,
    ops,
    predict,
    sweeps,
    workers,
)
from service.api.security import ApiKeyMiddleware, keys_from
from service.domain.event_reads import SharedReads
from service.domain.ops import StoreSize, WriteProbe
from service.domain.retention import Retention, RetentionThread
from service.errors import ServiceError
from service.serving.batching import ForwardBatcher
from service.serving.decode_slots import DecodeSlots
from service.serving.predictor import ModelCache, Predictor
from service.serving.registry import ResolutionCache
from service.settings import Settings, get_settings
from service.store import availability, wakeups
from service.store.artifacts.backends import ArtifactSource
from service.store.engines import REQUEST_LOCK_WAIT_S, make_engine, make_sessionmaker
from service.store.outage import is_outage

log = logging.getLogger("service")
ERROR_LOGGED_SCOPE_KEY = "mnist.error_logged"


def _error(status: int, code: str, message: str, details: Any = None, **extra: str) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, **extra}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"loc": list(err["loc"]), "msg": _in_context(request, err), "type": err["type"]}
        for err in exc.errors()
    ]
    message = "; ".join(f"{_field(d['loc'])}: {d['msg']}" for d in details)
    return _error(422, "validation_error", message or "invalid request", details)


def _in_context(request: Request, error: dict[str, Any]) -> str:
    """An error's message, or what it means where FastAPI left the body unread: a body sent as
    another media type than JSON is handed to the model as bytes, and "Input should be a valid
    dictionary" would tell a client who sent a JSON object nothing."""
    sent_as = request.headers.get("content-type", "")
    unread = tuple(error["loc"]) == ("body",) and error["type"] == "model_attributes_type"
    if unread and not predict.is_json(predict.media_type(sent_as)):
        came = repr(sent_as) if sent_as else "with no Content-Type"
        return f"the body must be JSON sent as application/json, not {came}"
    return str(error["msg"])


def all_routes(app: FastAPI) -> list[BaseRoute]:
    """Every route of the app, flat: newer FastAPI nests included routers in ``app.routes``."""
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    if iterate is None:
        return list(app.routes)
    return [context.route for context in iterate(app.routes)]


def _route(app: FastAPI, method: str, path: str) -> Route:
    """The route that answers ``method path`` (a template, as declared)."""
    for route in all_routes(app):
        if isinstance(route, Route) and route.path == path and method in (route.methods or ()):
            return route
    raise LookupError(f"no route answers {method} {path}")


def _allowed_methods(request: Request) -> str:
    # Starlette's 405 names the methods of the first route on the path only (POST for /jobs,
    # which GET serves too); Allow must list every method the path answers.
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in all_routes(request.app):
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")  # HeadAsGet: wherever GET is answered
    return ", ".join(sorted(methods))


def _without_slash(request: Request) -> str | None:
    """Where a path with a trailing slash is answered, if a route takes it without one: a
    relative ``Location`` (RFC 9110, section 10.2.2), its query kept. Starlette's own redirect
    wrote the Location from the Host header, whatever name a client put there."""
    path: str = request.scope.get("path", "")
    if path == "/" or not path.endswith("/"):
        return None
    bare = {**request.scope, "path": path.rstrip("/")}
    if not any(route.matches(bare)[0] is not Match.NONE for route in all_routes(request.app)):
        return None
    query = request.scope.get("query_string", b"").decode("latin-1")
    return quote(request.scope.get("root_path", "") + bare["path"]) + (f"?{query}" if query else "")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and (location := _without_slash(request)) is not None:
        return RedirectResponse(location, status_code=307)
    message = unreadable_body(exc.__cause__) if exc.status_code == 400 else None
    response = _error(exc.status_code, f"http_{exc.status_code}", message or str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    if exc.status_code == 405:
        response.headers["Allow"] = _allowed_methods(request)
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A database outage is no bug: 503 with Retry-After, logged as the outage starts and ends.
    if is_outage(exc):
        availability.API_OUTAGE.failed(exc, "a request")
        return await _service_error(request, availability.unavailable(exc))
    # The client learns only the request id; the log has the traceback under that id. An
    # error in the service's own layers reaches this handler outside the request-id layer, so
    # it sets X-Request-ID itself.
    rid = request_id(request.scope) or secrets.token_hex(16)
    # Two layers call this handler for an error in a route (FastAPI's own, which answers, and
    # the one in front of the service's layers, which sees the error go by): log it once.
    if not request.scope.get(ERROR_LOGGED_SCOPE_KEY):
        request.scope[ERROR_LOGGED_SCOPE_KEY] = True
        log.error(
            "unhandled error on %s %s [request %s]",
            request.method,
            request.url.path,
            rid,
            exc_info=exc,
        )
    response = _error(
        500,
        "internal_error",
        f"internal server error; quote request id {rid} when you report it",
        request_id=rid,
    )
    response.headers[REQUEST_ID_HEADER] = rid
    return response


class ServiceApp(FastAPI):
    """FastAPI behind the service's own ASGI layers (``edge``), which every request meets first.

    The layers (metrics, request ids, the API key, the body limits, the fast lanes) sit in front
    of FastAPI rather than among its middlewares: a request a fast lane answers then skips
    FastAPI's and Starlette's own layers (OpenTelemetry's per-request provider lookups, error
    guards), about a quarter of its CPU, and the body limits see every body before a lane or a
    route reads it. An unexpected error in these layers still gets the service's 500 envelope;
    FastAPI's native OpenTelemetry sees the requests that reach it.
    """

    edge: ASGIApp | None = None
    quick: QuickAnswers | None = None  # answers the edge protocol gives (service/api/edge/quick.py)
    # Whether a request (its scope) is for an event stream (service/api/edge/protocol.py).
    is_event_stream: Callable[[Scope], bool] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Lifespan to FastAPI; every request through ``edge``, which hands on to FastAPI."""
        if self.edge is None or scope["type"] == "lifespan":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        await self.edge(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; the engine and the model cache live for the app's lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One small MLP per request: extra intra-op threads only contend with the server's.
        torch.set_num_threads(1)
        engine = make_engine(settings.database_url, lock_wait_s=REQUEST_LOCK_WAIT_S)
        app.state.settings = settings
        # Polls (the fast lane's) and event streams read through connections of their own,
        # never the shared pool.
        poll_reads = PollReads(settings.database_url)
        app.state.poll_reads = poll_reads
        app.state.read_sessions = make_sessionmaker(engine, read_only=True)
        app.state.write_sessions = make_sessionmaker(engine)
        # New jobs wake the workers; the workers' progress wakes this process's event streams.
        wakeups.attach(app.state.write_sessions, settings.database_url, enabled=settings.wakeups)
        listener = wakeups.listen(
            settings.database_url, [wakeups.JOB_PROGRESS], enabled=settings.wakeups
        )
        app.state.wakeups = listener
        app.state.shared_reads = SharedReads()  # a job's streams at one place read once
        app.state.write_probe = WriteProbe(app.state.write_sessions, settings.ready_write_probe_s)
        app.state.store_size = StoreSize()
        retention = None
        if settings.retention_days is not None:
            retention = RetentionThread(
                Retention(
                    app.state.write_sessions, settings.checkpoint_dir, settings.retention_days
                )
            )
            retention.start()
        app.state.predictor = Predictor(
            app.state.read_sessions,
            ModelCache(
                ArtifactSource(settings.checkpoint_dir, app.state.read_sessions),
                settings.model_cache_size,
            ),
            ResolutionCache(settings.model_resolve_ttl_s),
            ForwardBatcher(),
            DecodeSlots(settings.max_decodes, settings.max_decode_queue),
        )
        # As the worker does (workers/worker.py): what startup loaded lives as long as the
        # process, so full collections need not walk it (a pause of every request meanwhile).
        gc.freeze()
        try:
            yield
        finally:
            if retention is not None:
                retention.stop()
            poll_reads.close()
            listener.close()
            engine.dispose()

    app = ServiceApp(
        redirect_slashes=False,  # as _without_slash answers
        title="MNIST training service",
        version="0.1.0",
        description=(
            "Start training jobs, watch every step's loss and every epoch's accuracy, and "
            "predict digits with the trained SimpleMLP."
        ),
        lifespan=lifespan,
        dependencies=[Depends(forbid_unknown_query)],
        generate_unique_id_function=openapi.operation_id,
        openapi_tags=openapi.TAGS,
        servers=openapi.SERVERS,
    )
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Database errors are judged here, among FastAPI's handlers: an outage's 503 is an answer,
    # not an error for the server's own last-resort layer to log again.
    app.add_exception_handler(SQLAlchemyError, _unexpected_error)
    # And the driver's own, which reads on its cursor raise (service/store/engines.py): judged
    # as the last resort, a 503 was sent and the error raised on, and the server then reset
    # the client's connection.
    app.add_exception_handler(sqlite3.Error, _unexpected_error)
    app.add_exception_handler(psycopg.Error, _unexpected_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(sweeps.router)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(workers.router)
    app.include_router(events.router)
    app.include_router(ops.router)
    app.include_router(dashboard.router)
    keys = keys_from(settings)
    app.state.metrics = ServiceMetrics()
    # Built innermost first: a request meets the metrics, the request id, then the key check
    # (so an unauthenticated client is turned away before its body is read), then the body
    # limits (before anything reads a byte of the body), then the fast lanes of event streams,
    # job and metrics polls and predict, then FastAPI.
    edge: ASGIApp = functools.partial(FastAPI.__call__, app)
    polls: PollLane | None = None
    stream_route = _route(app, "GET", "/jobs/{job_id}/events")
    app.is_event_stream = functools.partial(is_event_stream, stream_route)
    if settings.fast_lanes:
        edge = PredictLane(edge, route=_route(app, "POST", PREDICT_PATH), settings=settings)
        edge = polls = PollLane(
            edge,
            metrics_route=_route(app, "GET", "/jobs/{job_id}/metrics"),
            job_route=_route(app, "GET", "/jobs/{job_id}"),
        )
        edge = StreamLane(edge, route=stream_route)
    edge = HeadAsGet(edge)  # a HEAD meets the lanes and the routes as the GET it asks about
    edge = limits = BodyLimitMiddleware(
        edge,
        max_body_bytes=settings.max_request_bytes,
        max_form_parts=settings.max_form_parts,
        max_form_field_bytes=settings.max_form_field_bytes,
    )
    edge = key_check = ApiKeyMiddleware(edge, keys=keys, docs_public=settings.docs_public)
    edge = RequestIdMiddleware(edge)
    edge = counted = RequestMetricsMiddleware(edge, metrics=app.state.metrics)
    app.edge = ServerErrorMiddleware(edge, handler=_unexpected_error)
    # What the HTTP protocol may answer itself, through these layers' own rules.
    if polls is not None:
        app.quick = QuickAnswers(
            app.state,
            polls=polls,
            metrics=counted,
            keys=key_check if keys is not None else None,
            limits=limits,
        )

    def complete_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
                servers=app.servers,
            )
            app.openapi_schema = openapi.complete(
                schema,
                auth=keys is not None,
                docs_public=settings.docs_public,
                max_form_parts=settings.max_form_parts,
                named=predict.NAMED_SCHEMAS,
            )
        return app.openapi_schema

    app.openapi = complete_openapi  # type: ignore[method-assign]
    return app
