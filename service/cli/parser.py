"""The ``mnist-service`` command line: its commands, options and exit codes.

The job options are made from the API's own schema (:class:`JobCreate`), so the CLI offers
exactly the fields the API accepts, with its descriptions and defaults.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Callable
from typing import Any

import httpx

from service.cli import EXIT_INTERRUPTED
from service.cli.client import API_KEY_ENV, DEFAULT_URL, URL_ENV
from service.clock import MAX_PAGE, is_job_id, is_key_text
from service.schemas import JobCreate
from service.schemas.sweeps import DISTRIBUTIONS
from service.status import JobStatus

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the watched job (or sweep) failed or was cancelled
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_API_ERROR = 3  # the API refused the request or could not be reached
EXIT_BROKEN_PIPE = 141  # the reader of our output went away, as a shell reports SIGPIPE
MAX_PORT = 65_535

DESCRIPTION = """\
mnist-service: train and use models through the API, or run the server side.

Client commands (talk to the API over HTTP): submit, jobs, sweep, sweeps, metrics, predict,
cancel, delete.
Server commands: api, worker, migrate, run."""

EPILOG = f"""\
The API's address comes from --url or ${URL_ENV} (default {DEFAULT_URL});
an API key, where the API wants one, from --api-key or ${API_KEY_ENV}.
Exit codes: {EXIT_OK} done, {EXIT_JOB_FAILED} the watched job or sweep failed or was cancelled,
{EXIT_USAGE} bad command line, {EXIT_API_ERROR} the API refused, could not be reached or is not
the MNIST service's, {EXIT_INTERRUPTED} interrupted (Ctrl-C), {EXIT_BROKEN_PIPE} the output was
closed early (as by | head)."""


class UsageError(Exception):
    """The command line asks for something impossible: exit 2, like argparse's own errors."""


def option_name(field: str) -> str:
    """The option of a JobCreate field: ``learning_rate`` → ``--learning-rate``."""
    return f"--{field.replace('_', '-')}"


def job_id(value: str) -> str:
    """A job's id as the API's pattern has it, else a bad command line: an id is put in the
    request's path, where ``../models/aliases/production`` named another resource (``delete``
    removed the alias)."""
    if not is_job_id(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a job id (32 hex digits)")
    return value


def page_limit(value: str) -> int:
    """How many items a listing asks for: 1 to the API's page, else a bad command line."""
    limit = int(value)
    if not 1 <= limit <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_PAGE}, not {limit}")
    return limit


def api_key(value: str) -> str:
    """An API key as a header can carry it (printable ASCII without spaces, as the service's
    keys are), else a bad command line: another made a traceback, or a header cut short."""
    if not is_key_text(value):
        raise argparse.ArgumentTypeError("an API key is printable ASCII without spaces")
    return value


def api_url(value: str) -> str:
    """The API's address: http(s) with a host, and no query or fragment (the paths are put
    after it: ``?x=1`` would swallow them), else a bad command line."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an http:// or https:// address with a host (e.g. {DEFAULT_URL})"
        )
    if url.query or url.fragment or "?" in value or "#" in value:
        raise argparse.ArgumentTypeError(
            f"{value!r} has a query or fragment (?…, #…): give the API's base address only"
        )
    if url.port is not None and not 0 < url.port <= MAX_PORT:
        # httpx takes it, and the connection went to the port modulo 65536, key and all.
        raise argparse.ArgumentTypeError(f"{value!r} names port {url.port}: ports are 1–{MAX_PORT}")
    return value


def count(value: str) -> int:
    """A number of processes: at least 1, else a bad command line (``run --workers -5``
    started the API with no worker and no word)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def check_client_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check ``--url`` and ``--api-key`` (or ${URL_ENV}, ${API_KEY_ENV}) for a client command
    only, exiting 2 as argparse does: a server command (migrate, api, worker, run) uses neither,
    and an ${URL_ENV} meant for the clients on the same host stopped it."""
    for option, check in (("url", api_url), ("api_key", api_key)):
        value = getattr(args, option)
        if value is None:
            continue
        try:
            check(value)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --{option.replace('_', '-')}: {exc}")


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
            option_name(name),
            dest=name,
            type=_number_type(field.annotation),
            metavar="N",
            help=f"{field.description} (API default: {default})",
        )


def _add_sweep_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The ``sweep`` and ``sweeps`` subcommands."""
    sweep = command("sweep", "queue a sweep: a grid or a random search over job parameters")
    sweep.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a field every trial shares (any of submit's, e.g. epochs=1); repeatable",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2,...",
        help="values to try; the trials are every combination of the --grid options",
    )
    sweep.add_argument("--random-trials", type=int, metavar="N", help="a random search of N")
    sweep.add_argument("--random-seed", type=int, metavar="S", help="its seed (default 0)")
    sweep.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="FIELD=KIND:A:B",
        help=f"where the random search draws a field; KIND one of {', '.join(DISTRIBUTIONS)} "
        "(choice:V1:V2:...), e.g. learning_rate=log_uniform:1e-4:1e-1",
    )
    sweep.add_argument("--promote", metavar="ALIAS", help="point it at the best trial at the end")
    sweep.add_argument(
        "--watch",
        action="store_true",
        help="show the trials (status, epoch, accuracy) until the sweep ends; "
        f"exit {EXIT_JOB_FAILED} if it fails or is cancelled",
    )
    sweeps = command("sweeps", "list the newest sweeps")
    sweeps.add_argument("--limit", type=page_limit, default=20, help="how many (default 20, 1-100)")
    sweeps.add_argument("--json", action="store_true", help="the API's JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-service`` command line."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="mnist-service", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter
    )
    parser.add_argument(
        "--url",  # checked for the client commands only (check_client_options)
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
    jobs.add_argument("--limit", type=page_limit, default=20, help="how many (default 20, 1-100)")
    jobs.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    metrics = command("metrics", "a job's loss per step and accuracy per epoch")
    metrics.add_argument("job_id", type=job_id, metavar="ID")
    metrics.add_argument(
        "--csv", action="store_true", help="every step as CSV: step,epoch,examples_seen,loss,…"
    )
    predict = command("predict", "the digit in each image (PNG, JPEG, …)")
    predict.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (one line each when several), or - for standard input",
    )
    predict.add_argument(
        "--model",
        metavar="ALIAS",
        help="the model an alias (e.g. production) points at",
    )
    predict.add_argument(
        "--job",
        type=job_id,
        metavar="JOB_ID",
        help="the model of this job. With neither, the API picks: the production alias's "
        "model if the alias is set, else the latest succeeded job's",
    )
    predict.add_argument("--json", action="store_true", help="the API's JSON answer")
    _add_sweep_commands(command)
    cancel = command("cancel", "cancel a queued or running job (or sweep)")
    cancel.add_argument("job_id", type=job_id, metavar="ID")
    cancel.add_argument("--sweep", action="store_true", help="ID is a sweep's: all its trials")
    delete = command("delete", "delete a job that has ended, with its metrics and checkpoint")
    delete.add_argument("job_id", type=job_id, metavar="ID")
    delete.add_argument("--sweep", action="store_true", help="ID is a sweep's: with its trials")

    command("api", "serve the API and the dashboard (python -m service)")
    worker = command("worker", "run workers (python -m workers)")
    worker.add_argument(
        "--concurrency", type=count, default=1, metavar="N", help="worker processes (default 1)"
    )
    migrate = command("migrate", "bring the database to the newest schema (alembic upgrade head)")
    migrate.add_argument(
        "--force", action="store_true", help="even while workers are heard from (older code)"
    )
    run = command("run", "the API and workers together (what `make run` starts)")
    run.add_argument(
        "--workers", type=count, default=1, metavar="N", help="worker processes (default 1)"
    )
    return parser
