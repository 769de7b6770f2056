"""``python -m workers``: worker processes with the service's settings."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from service.logs import configure_logging
from service.settings import get_settings
from service.store.engines import make_engine, make_sessionmaker
from workers.signals import on_signals
from workers.supervisor import supervise
from workers.worker import Worker


def install_signal_handlers(stop: threading.Event) -> None:
    """First SIGINT/SIGTERM: stop claiming and hand the running job back. Second: exit now."""

    def stopping(signum: int) -> None:
        logging.getLogger("workers").info("signal %d: stopping (again to exit at once)", signum)
        stop.set()

    def exit_now(signum: int) -> None:
        os._exit(128 + signum)

    on_signals(stopping, exit_now)


def main(argv: list[str] | None = None) -> int:
    """Run one worker until signalled, or ``--concurrency N`` worker processes."""
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the queue (default 1)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.concurrency > 1:
        return supervise([["-m", "workers"] for _ in range(args.concurrency)])
    settings = get_settings()
    configure_logging(settings)
    engine = make_engine(settings.database_url)
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        # tqdm bars would break one-JSON-object-per-line logs: JSON logs get a line per epoch.
        show_progress = settings.log_format == "text"
        Worker(settings, make_sessionmaker(engine), stop=stop, show_progress=show_progress).run()
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
