"""``python -m workers``: worker processes with the service's settings."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading

from sqlalchemy.exc import SQLAlchemyError

from service.logs import configure_logging
from service.settings import REFUSED_EXIT_STATUS, Settings, get_settings
from service.store import migrations, wakeups, worker_repo
from service.store.engines import make_engine, make_sessionmaker
from workers.host import host_problems, pid_space
from workers.signals import on_signals
from workers.supervisor import follow_supervisor, supervise


def install_signal_handlers(stop: threading.Event) -> None:
    """First SIGINT/SIGTERM: stop claiming and hand the running job back. Second: exit now."""

    def stopping(signum: int) -> None:
        logging.getLogger("workers").info("signal %d: stopping (again to exit at once)", signum)
        stop.set()

    def exit_now(signum: int) -> None:
        os._exit(128 + signum)

    on_signals(stopping, exit_now)


def check(settings: Settings) -> int:
    """0 when a worker on this host was heard from within one lease and the host can serve
    its jobs (:func:`host_problems`), else 1 and why.

    A container's health check: the heartbeat row is what says a worker is alive and reaches
    the database. Imports no torch, so it costs a query and an interpreter's start.
    """
    host = socket.gethostname()
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            live = worker_repo.live_workers(session, lease_s=settings.lease_s)
    except SQLAlchemyError as exc:
        print(f"unhealthy: the database is unreachable: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    here = pid_space()  # this container's or machine's, not every one of its hostname
    mine = [w.id for w, _ in live if w.pid_space == here]
    if not mine:
        print(f"unhealthy: no worker on {host} was heard from in {settings.lease_s:g} s")
        return 1
    problems = host_problems(settings)
    for problem in problems:
        print(f"unhealthy: {problem}")
    if problems:
        return 1
    print(f"healthy: {', '.join(mine)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one worker until signalled, or ``--concurrency N`` worker processes (restarted when
    one dies, see :func:`workers.supervisor.supervise`), or ``--check`` the workers' health.
    Refuses (exit status 2) a database whose schema is not this code's."""
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the queue (default 1)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if a worker on this host has a fresh heartbeat (a health check)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    follow_supervisor()
    settings = get_settings()
    if args.check:
        return check(settings)
    configure_logging(settings)
    problem = migrations.startup_problem(settings.database_url)
    if problem is not None:  # its first query would fail, and its supervisor restart it
        print(f"python -m workers: {problem}", file=sys.stderr)
        return REFUSED_EXIT_STATUS
    if args.concurrency > 1:
        n = args.concurrency
        children = {f"worker-{i}": ["-m", "workers"] for i in range(1, n + 1)}
        return supervise(
            children, refused=(REFUSED_EXIT_STATUS,), grace_s=settings.shutdown_grace_s
        )
    from service.ml import DeviceUnavailable  # torch: not for --check or the supervisor
    from workers.worker import Worker

    engine = make_engine(settings.database_url, lease_s=settings.lease_s)
    stop = wakeups.StopEvent()
    install_signal_handlers(stop)
    try:
        # tqdm bars would break one-JSON-object-per-line logs: JSON logs get a line per epoch.
        show_progress = settings.log_format == "text"
        try:
            sessions = make_sessionmaker(engine)
            worker = Worker(settings, sessions, stop=stop, show_progress=show_progress)
        except DeviceUnavailable as exc:  # a traceback, and a restart that could not help
            print(f"python -m workers: {exc}", file=sys.stderr)
            return REFUSED_EXIT_STATUS
        worker.run()
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
