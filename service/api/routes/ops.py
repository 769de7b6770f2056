"""Operations: readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import ReadSessionsDep, SessionDep, SettingsDep
from service.api.metrics import CONTENT_TYPE, ServiceMetrics
from service.clock import utcnow
from service.domain import ops
from service.schemas import ErrorEnvelope, Readiness
from service.store import availability
from service.store.outage import is_outage

router = APIRouter(tags=["health"])
log = logging.getLogger("service.ops")


# HEAD (a load balancer's cheap probe) is the GET's without the body (asgi.HeadAsGet).
@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": ErrorEnvelope,
            "description": "A check failed (see details).",
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before asking again.",
                    "required": True,
                    "schema": {"type": "integer"},
                }
            },
        }
    },
)
def readyz(request: Request, session: SessionDep, settings: SettingsDep) -> Readiness:
    """Ready to serve: database reachable and taking writes, schema at head, a live worker if
    required. ``HEAD`` answers the same status without a body."""
    writes: ops.WriteProbe = request.app.state.write_probe
    size: ops.StoreSize = request.app.state.store_size
    return ops.readiness(session, settings, now=utcnow(), writes=writes, size=size)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
def metrics(request: Request, sessions: ReadSessionsDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: requests, jobs by status, queue depth, workers, images/s, the
    store's bytes."""
    service_metrics: ServiceMetrics = request.app.state.metrics
    # A session of its own, not the request's (SessionDep): a scrape answers through an outage,
    # and the request's session would take that answer for a sign the database is back.
    try:
        with sessions() as session:
            figures = ops.store_figures(
                session,
                settings,
                service_metrics.throughput,
                now=utcnow(),
                size=request.app.state.store_size,
            )
    except SQLAlchemyError as exc:
        if is_outage(exc):
            availability.API_OUTAGE.failed(exc, "metrics")  # logged as it starts, not per scrape
        else:
            log.warning("metrics: database unreadable: %s", exc)
        figures = None
    service_metrics.observe_store(figures)
    return Response(service_metrics.render(), media_type=CONTENT_TYPE)
