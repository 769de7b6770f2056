"""mnist-service: train and use models through the API, or run the server side.

Client commands (talk to the API over HTTP): submit, jobs, metrics, predict, cancel.
Server commands: api, worker, migrate, run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.api.security import REFUSED_EXIT_STATUS, exposure_problem
from service.cli.client import API_KEY_ENV, DEFAULT_URL, URL_ENV, ApiError, Client
from service.cli.watch import watch
from service.logs import configure_logging
from service.schemas import JobCreate
from service.settings import get_settings
from service.status import JobStatus
from service.store import migrations

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the watched job failed or was cancelled
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_API_ERROR = 3  # the API refused the request or could not be reached
EXIT_INTERRUPTED = 130
BAR_WIDTH = 30  # characters of a probability bar

EPILOG = f"""\
The API's address comes from --url or ${URL_ENV} (default {DEFAULT_URL});
an API key, where the API wants one, from --api-key or ${API_KEY_ENV}.
Exit codes: {EXIT_OK} done, {EXIT_JOB_FAILED} the watched job failed or was cancelled,
{EXIT_USAGE} bad command line, {EXIT_API_ERROR} the API refused or could not be reached."""


# --- server side ----------------------------------------------------------------------------


def migrate() -> int:
    """Bring the database to the newest schema (``alembic upgrade head``), logging each step
    as the service logs (there is no alembic.ini to configure alembic's logging)."""
    configure_logging(get_settings())
    migrations.upgrade()
    return EXIT_OK


def run_all(workers: int) -> int:
    """Start the API and ``workers`` worker processes, start again any that dies; Ctrl-C stops
    them all cleanly (:func:`workers.supervisor.supervise` says when it gives up instead)."""
    settings = get_settings()
    configure_logging(settings)
    problem = exposure_problem(settings)
    if problem is not None:  # before any worker starts, not when the API exits early
        print(f"mnist-service: {problem}", file=sys.stderr)
        return REFUSED_EXIT_STATUS
    from workers.supervisor import supervise

    base = f"http://{settings.host}:{settings.port}"
    print(
        f"\nMNIST service: dashboard {base}/  API docs {base}/docs  "
        f"database {settings.database_url}  checkpoints {settings.checkpoint_dir}\n"
        f"  try: mnist-service submit --epochs 1 --watch\n"
        "  A process that dies is started again; Ctrl-C stops the API and the workers.\n",
        flush=True,
    )
    children = {"api": ["-m", "service"]}
    children.update({f"worker-{i}": ["-m", "workers"] for i in range(1, workers + 1)})
    return supervise(children, refused=(REFUSED_EXIT_STATUS,))


# --- client side ----------------------------------------------------------------------------


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _age(iso: str, now: datetime) -> str:
    seconds = max(0.0, (now - datetime.fromisoformat(iso)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _job_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name)
        for name in JobCreate.model_fields
        if getattr(args, name, None) is not None
    }


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    """Queue a job; with --watch, follow it to its end."""
    job = client.submit(_job_params(args))
    print(job["id"], flush=True)
    if not args.watch:
        return EXIT_OK
    try:
        final = watch(client, job["id"], sys.stderr)
    except KeyboardInterrupt:
        print(
            f"stopped watching; job {job['id']} goes on "
            f"(stop it with: mnist-service cancel {job['id']})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    status = final.get("status")
    if status == "succeeded":
        print(f"job {job['id']} succeeded: test accuracy {_percent(final.get('accuracy'))}")
        return EXIT_OK
    reason = f": {final['error']}" if final.get("error") else ""
    print(f"job {job['id']} {status}{reason}", file=sys.stderr)
    return EXIT_JOB_FAILED


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    """List the newest jobs."""
    jobs = client.jobs(status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [("ID", "STATUS", "EPOCH", "STEP", "ACCURACY", "DEVICE", "AGE")]
    for job in jobs:
        rows.append(
            (
                job["id"],
                job["status"],
                f"{job['epoch']}/{job['params']['epochs']}",
                f"{job['step']}/{job['total_steps']}",
                _percent(job["accuracy"]),
                job["device"] or "-",
                _age(job["created_at"], now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    if not jobs:
        print("no jobs yet: mnist-service submit --watch", file=sys.stderr)
    return EXIT_OK


def cmd_metrics(client: Client, args: argparse.Namespace) -> int:
    """A job's steps and epochs: a summary, or every step as CSV."""
    metrics = client.metrics(args.job_id)
    steps, epochs = metrics["steps"], metrics["epochs"]
    if args.csv:
        # One row per step; an epoch's test accuracy sits on the row of its last step.
        accuracy_at = {e["examples_seen"]: e["accuracy"] for e in epochs}
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["step", "epoch", "examples_seen", "loss", "test_accuracy"])
        for i, s in enumerate(steps):
            last_of_epoch = i + 1 == len(steps) or steps[i + 1]["epoch"] != s["epoch"]
            accuracy = accuracy_at.get(s["examples_seen"]) if last_of_epoch else None
            writer.writerow(
                [s["step"], s["epoch"], s["examples_seen"], repr(s["loss"]), accuracy or ""]
            )
        return EXIT_OK
    print(f"job {metrics['job_id']}: {metrics['status']}, {len(steps)} steps recorded")
    if steps:
        print(f"loss: first {steps[0]['loss']:.4f}, last {steps[-1]['loss']:.4f}")
    for e in epochs:
        print(
            f"epoch {e['epoch']}: test accuracy {_percent(e['accuracy'])} "
            f"after {e['examples_seen']} images"
        )
    return EXIT_OK


def cmd_predict(client: Client, args: argparse.Namespace) -> int:
    """The digit in an image file ('-' reads standard input)."""
    if args.image == "-":
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        path = Path(args.image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        name = path.name
    answer = client.predict(data, name, job_id=args.model)
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    probabilities = answer["probabilities"]
    print(
        f"digit {answer['digit']} ({_percent(probabilities[answer['digit']], 1)}) "
        f"by the model of job {answer['job_id']}"
    )
    for digit, p in enumerate(probabilities):
        bar = "█" * round(p * BAR_WIDTH)
        mark = " ←" if digit == answer["digit"] else ""
        print(f"  {digit} {bar:<{BAR_WIDTH}} {_percent(p, 1):>7}{mark}")
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    """Cancel a job."""
    job = client.cancel(args.job_id)
    if job["status"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:
        print(f"job {job['id']} is {job['status']}: its worker stops it within a second or so")
    return EXIT_OK


# --- the command line ------------------------------------------------------------------------


def _number_type(annotation: Any) -> Callable[[str], Any]:
    """int or float for a JobCreate field (``int | None`` → int)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return int if annotation is int else float


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """One option per JobCreate field, so the CLI offers exactly what the API accepts."""
    for name, field in JobCreate.model_fields.items():
        default = "none" if field.default is None else field.default
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_number_type(field.annotation),
            metavar="N",
            help=f"{field.description} (API default: {default})",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-service`` command line."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="mnist-service", description=__doc__, epilog=EPILOG, formatter_class=formatter
    )
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV) or DEFAULT_URL,
        help=f"the API (default ${URL_ENV} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"sent as 'Authorization: Bearer KEY' (default ${API_KEY_ENV})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_, description=help_, epilog=EPILOG, formatter_class=formatter
        )

    submit = command("submit", "queue a training job (prints its id); --watch follows it")
    _add_job_options(submit)
    submit.add_argument(
        "--watch",
        action="store_true",
        help="show a progress bar per epoch with loss and accuracy until the job ends; "
        f"exit {EXIT_JOB_FAILED} if it fails or is cancelled",
    )
    jobs = command("jobs", "list the newest jobs")
    jobs.add_argument("--status", choices=[status.value for status in JobStatus], help="only these")
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20, at most 100)")
    jobs.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    metrics = command("metrics", "a job's loss per step and accuracy per epoch")
    metrics.add_argument("job_id", metavar="ID")
    metrics.add_argument(
        "--csv", action="store_true", help="every step as CSV: step,epoch,examples_seen,loss,…"
    )
    predict = command("predict", "the digit in an image (PNG, JPEG, …)")
    predict.add_argument("image", metavar="IMAGE", help="an image file, or - for standard input")
    predict.add_argument(
        "--model", metavar="JOB_ID", help="the job whose model answers (default: the latest)"
    )
    predict.add_argument("--json", action="store_true", help="the API's JSON answer")
    cancel = command("cancel", "cancel a queued or running job")
    cancel.add_argument("job_id", metavar="ID")

    command("api", "serve the API and the dashboard (python -m service)")
    worker = command("worker", "run workers (python -m workers)")
    worker.add_argument(
        "--concurrency", type=int, default=1, metavar="N", help="worker processes (default 1)"
    )
    command("migrate", "bring the database to the newest schema (alembic upgrade head)")
    run = command("run", "the API and workers together (what `make run` starts)")
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    return parser


CLIENT_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "metrics": cmd_metrics,
    "predict": cmd_predict,
    "cancel": cmd_cancel,
}


def main(argv: Sequence[str] | None = None, *, http: httpx.Client | None = None) -> int:
    """Parse the command line and run a subcommand; ``http`` replaces the HTTP client (tests)."""
    args = build_parser().parse_args(argv)
    handler = CLIENT_COMMANDS.get(args.command)
    if handler is not None:
        client = Client(args.url, api_key=args.api_key, http=http)
        try:
            return handler(client, args)
        except ApiError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            for detail in exc.details:
                if "loc" in detail and "msg" in detail:
                    where = ".".join(str(p) for p in detail["loc"] if p != "body")
                    print(f"  {where}: {detail['msg']}", file=sys.stderr)
            return EXIT_API_ERROR
        finally:
            if http is None:
                client.close()
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
