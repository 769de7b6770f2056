"""The server side of ``mnist-service``: migrate, and run the API with its workers.

Apart from the client commands so that ``mnist-service jobs`` does not load alembic and the
API's security module just to list jobs.
"""

from __future__ import annotations

import socket
import sys

from alembic.util import CommandError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from service.api.security import exposure_problem
from service.logs import configure_logging
from service.settings import REFUSED_EXIT_STATUS, Settings, get_settings
from service.store import migrations


def migrate(*, force: bool = False) -> int:
    """Bring the database to the newest schema (``alembic upgrade head``), logging each step
    as the service logs (there is no alembic.ini to configure alembic's logging).

    A failure is one line, not alembic's traceback: exit 2 (not retried: systemd's
    ``RestartPreventExitStatus``) for a database at a revision this code does not know, 1 for
    one it cannot reach or change (which a later try may), 1 while workers are heard from and
    the schema would change under them (unless ``force``): the systemd unit's migrate of one
    upgraded host then waits, retried, for the others to stop."""
    settings = get_settings()
    configure_logging(settings)
    in_the_way = (
        [] if force else migrations.workers_in_the_way(settings.database_url, settings.lease_s)
    )
    if in_the_way:
        print(
            f"mnist-service migrate: {len(in_the_way)} worker(s) heard from within "
            f"MNIST_LEASE_S ({', '.join(in_the_way[:3])}): the upgrade would change the schema "
            "under their code; stop every worker and API first (or --force); nothing was changed",
            file=sys.stderr,
        )
        return 1
    try:
        migrations.upgrade()
    except CommandError as exc:
        print(
            f"mnist-service migrate: {exc}: the database was migrated by newer code, or is "
            "another application's; nothing was changed",
            file=sys.stderr,
        )
        return REFUSED_EXIT_STATUS
    except (SQLAlchemyError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"mnist-service migrate: the database was not migrated: {reason}", file=sys.stderr)
        return 1
    return 0


def banner(settings: Settings) -> str:
    """Where to look, as ``mnist-service run`` starts: the database without its password
    (the systemd unit's journal keeps what this prints)."""
    base = f"http://{settings.host}:{settings.port}"
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    return (
        f"\nMNIST service: dashboard {base}/  API docs {base}/docs  "
        f"database {database}  checkpoints {settings.checkpoint_dir}\n"
        f"  try: mnist-service submit --epochs 1 --watch\n"
        "  A process that dies is started again; Ctrl-C stops the API and the workers.\n"
    )


def port_taken(host: str, port: int) -> str | None:
    """Why the API could not listen on ``host``:``port``, tried as uvicorn binds; None if it
    can. A second ``run`` started its workers (which claimed jobs) while its API failed to
    bind, restarted five times over half a minute."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def run_all(workers: int) -> int:
    """Start the API and ``workers`` worker processes, start again any that dies; Ctrl-C stops
    them all cleanly (:func:`workers.supervisor.supervise` says when it gives up instead)."""
    settings = get_settings()
    configure_logging(settings)
    problem = exposure_problem(settings)
    if problem is not None:  # before any worker starts, not when the API exits early
        print(f"mnist-service: {problem}", file=sys.stderr)
        return REFUSED_EXIT_STATUS
    if (taken := port_taken(settings.host, settings.port)) is not None:
        # 1, not 2: the port of a stop still under way frees itself, and systemd tries again.
        print(f"mnist-service: {taken} (another `run`?); nothing started", file=sys.stderr)
        return 1
    from workers.supervisor import supervise

    print(banner(settings), flush=True)
    children = {"api": ["-m", "service"]}
    children.update({f"worker-{i}": ["-m", "workers"] for i in range(1, workers + 1)})
    return supervise(children, refused=(REFUSED_EXIT_STATUS,), grace_s=settings.shutdown_grace_s)
