"""The FastAPI application: ``create_app()`` wires settings, database, routes and errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db import make_engine, make_sessionmaker
from service.errors import ServiceError
from service.metrics import RequestMetricsMiddleware, ServiceMetrics
from service.predict import ModelCache
from service.routes import dashboard, events, health, jobs, models, ops, predict, workers
from service.settings import Settings, get_settings

log = logging.getLogger("service")


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse(exc.envelope(), status_code=exc.status_code)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in exc.errors()
    ]
    message = "; ".join(f"{_field(d['loc'])}: {d['msg']}" for d in details)
    return _error(422, "validation_error", message or "invalid request", details)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = _error(exc.status_code, f"http_{exc.status_code}", str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal_error", "internal server error")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; the engine and the model cache live for the app's lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One small MLP per request: extra intra-op threads only contend with the server's.
        torch.set_num_threads(1)
        engine = make_engine(settings.database_url)
        app.state.settings = settings
        app.state.read_sessions = make_sessionmaker(engine, read_only=True)
        app.state.write_sessions = make_sessionmaker(engine)
        app.state.model_cache = ModelCache(settings.checkpoint_dir, settings.model_cache_size)
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="MNIST training service",
        version="0.1.0",
        description=(
            "Start training jobs, watch every step's loss and every epoch's accuracy, and "
            "predict digits with the trained SimpleMLP."
        ),
        lifespan=lifespan,
    )
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(workers.router)
    app.include_router(events.router)
    app.include_router(ops.router)
    app.include_router(dashboard.router)
    app.state.metrics = ServiceMetrics()
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    return app
