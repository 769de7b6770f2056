"""Prometheus metrics of the API: requests by route template, and the database's figures.

Each app has its own registry (tests build many apps in one process). Request metrics come
from an ASGI middleware; the store's gauges are computed when ``GET /metrics`` is scraped.

A server of several processes (``MNIST_API_WORKERS``) answers each scrape from one of them, so
their request counts are shared through prometheus_client's multiprocess mode: the launcher
gives them a folder (:func:`shared_counts`) before they start, each writes its counters and
histograms there, and the process that answers a scrape adds them all up. The store's gauges
are not shared: the database has one answer, which the answering process reads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import Receive, Scope, Send

from service.domain.ops import StoreFigures, Throughput

UNMATCHED_ROUTE = "<unmatched>"  # one label for every unknown path: bounded cardinality
# The route label of the requests the edge protocol refused before any app saw them (a header
# block too large, a deadline, the connection cap, bytes that are not HTTP): a flood of them
# (a slowloris, the cap reached) showed nowhere.
EDGE_ROUTE = "<edge>"
# The method label, bounded the same way: any other token a client sends counts as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# prometheus_client's own variable: read when it is imported, so set before a process starts.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# No ``_created`` series beside every counter and histogram: a timestamp per label set that
# doubles the scrape and that Prometheus stores as one more series each. (prometheus_client's
# switch is process-wide; the multiprocess collector, reading the shared files, has none.)
disable_created_metrics()  # type: ignore[no-untyped-call]


@contextmanager
def shared_counts(processes: int) -> Iterator[None]:
    """The folder the server's ``processes`` share their counts through, for as long as they run.

    The operator's ``PROMETHEUS_MULTIPROC_DIR`` if set (created if missing; a previous run's
    files are removed, else their counts would be added to this run's); otherwise, for
    several processes, a fresh temporary folder set in the environment (the workers inherit
    it) and removed at exit. One process without it needs none: its registry holds the counts.
    """
    given = os.environ.get(MULTIPROCESS_DIR_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield
        return
    if processes <= 1:
        yield
        return
    folder = Path(tempfile.mkdtemp(prefix="mnist-prometheus-"))
    os.environ[MULTIPROCESS_DIR_ENV] = str(folder)
    try:
        yield
    finally:
        del os.environ[MULTIPROCESS_DIR_ENV]
        shutil.rmtree(folder, ignore_errors=True)


def shared_counts_dir() -> str | None:
    """The folder this process writes its counts to, or None when they stay in memory.

    prometheus_client chose when it was imported, from the environment; asking it (rather than
    the environment now) keeps a scrape reading where the counts really are.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(MULTIPROCESS_DIR_ENV)


class StoreGauges:
    """The database's figures as gauges, as the process answering the scrape read them.

    A custom collector rather than prometheus_client Gauges: in multiprocess mode every
    process would keep its own (and a scrape would show them all, or their sum), while the
    database has one answer. The throughput is a rate since the previous scrape this process
    answered.
    """

    def __init__(self) -> None:
        self.figures: StoreFigures | None = None  # this scrape's figures
        self.database_up = False

    def observe(self, figures: StoreFigures | None) -> None:
        """This scrape's figures; None when the database could not be read: then the gauges
        read from it are left out, and Prometheus marks them stale. Shown as they last stood,
        they said a worker lived and trained at full speed through an outage in which it
        had died, and no alert on them could fire."""
        self.database_up = figures is not None
        self.figures = figures

    def collect(self) -> Iterable[Metric]:
        """The gauges (prometheus_client's collector protocol)."""
        yield GaugeMetricFamily(
            "mnist_database_up",
            "1 if the last scrape read the database, 0 if it could not.",
            value=1 if self.database_up else 0,
        )
        figures = self.figures
        if figures is None:
            return
        jobs = GaugeMetricFamily("mnist_jobs", "Jobs by status.", labels=["status"])
        for status, count in figures.jobs_by_status.items():
            jobs.add_metric([str(status)], count)
        yield jobs
        yield GaugeMetricFamily(
            "mnist_queue_depth", "Jobs queued and waiting for a worker.", figures.queue_depth
        )
        yield GaugeMetricFamily(
            "mnist_workers_live",
            "Workers whose heartbeat is younger than MNIST_LEASE_S.",
            figures.live_workers,
        )
        yield GaugeMetricFamily(
            "mnist_training_images_per_second",
            "Training images per second over all running jobs, between the last two scrapes.",
            figures.images_per_second,
        )
        if figures.store_bytes is not None:
            yield GaugeMetricFamily(
                "mnist_store_bytes",
                "Bytes the database takes (SQLite: file and WAL; PostgreSQL: pg_database_size).",
                figures.store_bytes,
            )


class ServiceMetrics:
    """The API's metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.shared_dir = shared_counts_dir()
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
        self.store = StoreGauges()
        self.registry.register(self.store)

    def observe_store(self, figures: StoreFigures | None) -> None:
        """Set the store's gauges; None when the database could not be read."""
        self.store.observe(figures)

    def render(self) -> bytes:
        """The text exposition format: every process's counts, this process's store figures."""
        if self.shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.shared_dir)  # type: ignore[no-untyped-call]
        registry.register(self.store)
        return generate_latest(registry)


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/jobs/{job_id}``), never the raw path.

    FastAPI names its own routes in the scope, but not the plain ones it adds for the
    documentation (``/openapi.json``, ``/docs``, ``/redoc``): those are found among the app's
    routes by the endpoint that answered.
    """
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    if route is None and endpoint is not None:
        app_routes = getattr(scope.get("app"), "routes", ())
        route = next((r for r in app_routes if getattr(r, "endpoint", None) is endpoint), None)
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
        status = 500  # what the client gets if the app raises before answering
        timed = False

        def observe_latency() -> None:
            nonlocal timed
            if not timed:
                timed = True
                self._latency_of(scope).observe(time.perf_counter() - started)

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
            self._count(scope, status)

    def answered(self, scope: Scope, status: int, started: float) -> None:
        """Count a request answered whole without passing through the middleware (the edge's
        quick answers, :mod:`service.api.edge.quick`), timed from ``started`` (``perf_counter``)."""
        self._latency_of(scope).observe(time.perf_counter() - started)
        self._count(scope, status)

    def _latency_of(self, scope: Scope) -> Any:
        method = _method(scope)
        return self._child(self._latency, self.metrics.latency, method, route_template(scope))

    def _count(self, scope: Scope, status: int) -> None:
        labels = (_method(scope), route_template(scope), str(status))
        self._child(self._requests, self.metrics.requests, *labels).inc()


def _method(scope: Scope) -> str:
    method: str = scope["method"]
    return method if method in KNOWN_METHODS else OTHER_METHOD
