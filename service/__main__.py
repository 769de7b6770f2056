"""``python -m service``: the API alone, with the service's settings."""

from __future__ import annotations

import gc
import logging
import sys

import uvicorn
from fastapi import FastAPI

from service.api.edge import server
from service.api.metrics import shared_counts
from service.api.security import exposure_problem
from service.logs import configure_logging
from service.settings import REFUSED_EXIT_STATUS, get_settings
from service.store import migrations
from workers.supervisor import follow_supervisor

APP_FACTORY = "service.__main__:serving_app"
# By import string, as the app: each server process imports it (and torch, with the app) once
# its supervisor's health check is answered. A process made by spawn imports this module and
# what its Config names before that; with torch among them, a loaded host's child took more
# than the check's 5 s, was killed as hung, and its replacement too, for good.
EDGE_PROTOCOL = "service.api.edge.protocol:EdgeProtocol"
# On SIGTERM, how long the requests in flight may take: an event stream lasts as long as its
# job, and one open dashboard tab held the stop until its supervisor killed the API (60 s).
# A stream cut then is resumed by its client (Last-Event-ID) on the API that answers next.
GRACEFUL_SHUTDOWN_S = 10


def serving_app() -> FastAPI:
    """The app as ``python -m service`` serves it, logging set up in this process too.

    uvicorn's worker processes start afresh and build their own app through this factory:
    without it their log records (and uvicorn's) would have no handler.
    """
    from service.api.app import create_app  # here, not above: EDGE_PROTOCOL says why

    settings = get_settings()
    configure_logging(settings)
    app = create_app(settings)
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Exempt everything built so far (torch, FastAPI, the app) from the cyclic collector.

    A full collection walks every object in the process: with torch loaded that is a pause
    every request in flight would wait out (it set the p99 of predict under load). Objects
    made at startup live as long as the process, so there is nothing to find among them.
    """
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Serve the API on MNIST_HOST:MNIST_PORT until interrupted.

    Refuses (exit status 2, with how to fix it) to serve without an API key on an address
    other machines can reach, unless MNIST_ALLOW_NO_AUTH=true, or on a database whose schema
    is not this code's (every route would fail).
    """
    follow_supervisor()
    settings = get_settings()
    configure_logging(settings)
    problem = exposure_problem(settings) or migrations.startup_problem(settings.database_url)
    if problem is not None:
        print(f"mnist-service: {problem}", file=sys.stderr)
        return REFUSED_EXIT_STATUS
    fd_limit = server.raise_fd_limit()
    cap = server.connection_cap(settings, fd_limit)
    if cap < settings.max_connections:
        logging.getLogger("service").warning(
            "at most %d connections per process, not MNIST_MAX_CONNECTIONS=%d: the descriptor "
            "limit is %d",
            cap,
            settings.max_connections,
            fd_limit,
        )
    # By import string: with several workers each process builds its own app (and engine,
    # model cache) from the same MNIST_* settings, and inherits the raised descriptor limit.
    # uvicorn picks uvloop; the protocol is its httptools one with our limits.
    # log_config=None: uvicorn's loggers propagate to the root handler set up above. The
    # processes share their Prometheus counts through a folder set up before they start.
    with shared_counts(settings.api_workers):
        config = uvicorn.Config(
            APP_FACTORY,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.api_workers,
            access_log=settings.access_log,
            log_config=None,
            log_level=settings.log_level.lower(),
            server_header=False,  # no need to tell every client which server version to probe
            # The edge's limits (service/api/edge/): header block, deadlines, connections.
            http=EDGE_PROTOCOL,
            ws="none",  # no WebSocket routes: a handshake is an HTTP request like any other
            timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server.serve(config)  # uvicorn.run's, with servers that sleep while idle
    return 0


if __name__ == "__main__":
    sys.exit(main())
