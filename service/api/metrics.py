"""Prometheus metrics of the API: requests by route template, and the database's figures.

Each app has its own registry (tests build many apps in one process). Request metrics come
from an ASGI middleware; the store's gauges are refreshed when ``GET /metrics`` is scraped.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.types import Receive, Scope, Send

from service.domain.ops import StoreFigures, Throughput

UNMATCHED_ROUTE = "<unmatched>"  # one label for every unknown path: bounded cardinality
# The method label, bounded the same way: any other token a client sends counts as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """The API's metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.throughput = Throughput()
        self.requests = Counter(
            "mnist_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mnist_http_request_duration_seconds",
            "Seconds from a request's arrival to its response headers, by route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.jobs = Gauge("mnist_jobs", "Jobs by status.", ["status"], registry=self.registry)
        self.queue_depth = Gauge(
            "mnist_queue_depth", "Jobs queued and waiting for a worker.", registry=self.registry
        )
        self.live_workers = Gauge(
            "mnist_workers_live",
            "Workers whose heartbeat is younger than MNIST_LEASE_S.",
            registry=self.registry,
        )
        self.images_per_second = Gauge(
            "mnist_training_images_per_second",
            "Training images per second over all running jobs, between the last two scrapes.",
            registry=self.registry,
        )
        self.database_up = Gauge(
            "mnist_database_up",
            "1 if the last scrape read the database, 0 if it could not.",
            registry=self.registry,
        )

    def observe_store(self, figures: StoreFigures | None) -> None:
        """Set the store's gauges; None when the database could not be read."""
        self.database_up.set(0 if figures is None else 1)
        if figures is None:
            return
        for status, count in figures.jobs_by_status.items():
            self.jobs.labels(status=status).set(count)
        self.queue_depth.set(figures.queue_depth)
        self.live_workers.set(figures.live_workers)
        self.images_per_second.set(figures.images_per_second)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/jobs/{job_id}``), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """Counts every HTTP request and times it to its response headers.

    Pure ASGI (no response buffering), so event streams pass through untouched; their
    latency is the time to their first byte.
    """

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # Each label set's child, looked up once: prometheus_client's labels() validates and
        # locks on every call, a few microseconds on each request.
        self._latency: dict[tuple[str, ...], Any] = {}
        self._requests: dict[tuple[str, ...], Any] = {}

    @staticmethod
    def _child(
        children: dict[tuple[str, ...], Any], metric: Counter | Histogram, *labels: str
    ) -> Any:
        child = children.get(labels)
        if child is None:
            child = children[labels] = metric.labels(*labels)
        return child

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER_METHOD
        status = 500  # what the client gets if the app raises before answering
        timed = False

        def observe_latency() -> None:
            nonlocal timed
            if not timed:
                timed = True
                route = route_template(scope)
                latency = self._child(self._latency, self.metrics.latency, method, route)
                latency.observe(time.perf_counter() - started)

        async def send_and_time(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                observe_latency()
            await send(message)

        try:
            await self.app(scope, receive, send_and_time)
        finally:
            observe_latency()
            route = route_template(scope)
            self._child(self._requests, self.metrics.requests, method, route, str(status)).inc()
