"""``mnist-service``: the server side from one command (api, worker, migrate, run)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.security import REFUSED_EXIT_STATUS, exposure_problem
from service.settings import get_settings

SHUTDOWN_GRACE_S = 10.0
ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def migrate() -> int:
    """Bring the database to the newest schema (``alembic upgrade head``)."""
    from alembic.config import Config

    from alembic import command

    command.upgrade(Config(str(ALEMBIC_INI)), "head")
    return 0


def run_all(workers: int) -> int:
    """Start the API and ``workers`` worker processes; Ctrl-C stops them all cleanly."""
    settings = get_settings()
    problem = exposure_problem(settings)
    if problem is not None:  # before any worker starts, not when the API exits early
        print(f"mnist-service: {problem}", file=sys.stderr)
        return REFUSED_EXIT_STATUS
    python = sys.executable
    procs = [subprocess.Popen([python, "-m", "service"])]
    procs += [subprocess.Popen([python, "-m", "workers"]) for _ in range(workers)]
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"\nMNIST service: API {base}  docs {base}/docs  "
        f"database {settings.database_url}  checkpoints {settings.checkpoint_dir}\n"
        f"  try: curl -X POST {base}/jobs -H 'content-type: application/json' -d '{{}}'\n"
        "  Ctrl-C stops the API and the worker.\n",
        flush=True,
    )
    interrupted = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        while all(p.poll() is None for p in procs) and not interrupted:
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [
        p.returncode for p in procs if p.returncode not in (0, -signal.SIGINT, -signal.SIGTERM)
    ]
    return 0 if interrupted or not failed else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run a subcommand."""
    parser = argparse.ArgumentParser(prog="mnist-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="serve the API (python -m service)")
    sub.add_parser("worker", help="run one worker (python -m workers)")
    sub.add_parser("migrate", help="alembic upgrade head")
    run = sub.add_parser("run", help="the API and workers together (what `make run` starts)")
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)

    if args.command == "api":
        from service.__main__ import main as api_main

        return api_main()
    if args.command == "worker":
        from workers.__main__ import main as worker_main

        return worker_main()
    if args.command == "migrate":
        return migrate()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_all(args.workers)


if __name__ == "__main__":
    sys.exit(main())
