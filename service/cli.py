"""``mnist-service``: the server side from one command (api, worker, migrate, run)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.settings import get_settings

ALEMBIC_INI = "alembic.ini"


def migrate() -> int:
    """Bring the database to the newest schema (``alembic upgrade head``)."""
    from alembic.config import Config

    from alembic import command

    # The project's alembic.ini: in the working folder (a container's /app), else the checkout.
    ini = Path(ALEMBIC_INI)
    if not ini.is_file():
        ini = Path(__file__).resolve().parent.parent / ALEMBIC_INI
    command.upgrade(Config(str(ini)), "head")
    return 0


def run_all(workers: int) -> int:
    """Start the API and ``workers`` worker processes; Ctrl-C stops them all cleanly."""
    from workers.supervisor import supervise

    settings = get_settings()
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"\nMNIST service: API {base}  docs {base}/docs  "
        f"database {settings.database_url}  checkpoints {settings.checkpoint_dir}\n"
        f"  try: curl -X POST {base}/jobs -H 'content-type: application/json' -d '{{}}'\n"
        "  Ctrl-C stops the API and the worker.\n",
        flush=True,
    )
    return supervise([["-m", "service"]] + [["-m", "workers"] for _ in range(workers)])


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run a subcommand."""
    parser = argparse.ArgumentParser(prog="mnist-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="serve the API (python -m service)")
    worker = sub.add_parser("worker", help="run workers (python -m workers)")
    worker.add_argument("--concurrency", type=int, default=1, metavar="N", help="processes")
    sub.add_parser("migrate", help="alembic upgrade head")
    run = sub.add_parser("run", help="the API and workers together (what `make run` starts)")
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)

    if args.command == "api":
        from service.__main__ import main as api_main

        return api_main()
    if args.command == "worker":
        from workers.__main__ import main as worker_main

        return worker_main(["--concurrency", str(args.concurrency)])
    if args.command == "migrate":
        return migrate()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_all(args.workers)


if __name__ == "__main__":
    sys.exit(main())
