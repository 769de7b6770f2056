"""mnist-service's commands: the client ones talk to the API over HTTP (:class:`Client`);
the server ones start the API, workers or migrations (:mod:`service.cli.server`).

Every way a command can fail ends in one of three places in :func:`main`: a bad command
line (exit 2), the API's refusal or absence (exit 3), or a closed output pipe (quiet).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from service.cli import EXIT_INTERRUPTED
from service.cli.client import URL_ENV, ApiError, Client
from service.cli.parser import (
    EXIT_API_ERROR,
    EXIT_BROKEN_PIPE,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    build_parser,
    check_client_options,
    option_name,
)
from service.cli.sweeps import cmd_sweep, cmd_sweeps
from service.cli.watch import watch
from service.schemas import JobCreate

__all__ = [  # the command line's entry point, and what its callers compare exit codes with
    "EXIT_API_ERROR",
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

BAR_WIDTH = 30  # characters of a probability bar
OUT_CHUNK = 65536  # characters of output a write takes at most (a pipe's buffer on Linux)


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _age(iso: str, now: datetime) -> str:
    seconds = max(0.0, (now - datetime.fromisoformat(iso)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _job_params(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line, checked by the API's own schema (:class:`JobCreate`)
    before anything is sent: NaN, infinities and values out of range are a bad command line."""
    params = {
        name: getattr(args, name)
        for name in JobCreate.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        JobCreate.model_validate(params)
    except ValidationError as exc:
        problems = [
            f"argument {option_name(str(error['loc'][0]))}: {error['msg']}"
            if error["loc"]
            else error["msg"]
            for error in exc.errors(include_url=False)
        ]
        raise UsageError("; ".join(problems)) from None
    return params


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


def write_out(text: str) -> None:
    """``text`` to standard output a pipe's buffer at a time. One large write whose reader
    left part-way (``| head -1``) was taken whole by CPython when unbuffered
    (``PYTHONUNBUFFERED=1``), the rest dropped silently and the command ending 0, where a
    pipeline expects the SIGPIPE status (141)."""
    for start in range(0, len(text), OUT_CHUNK):
        sys.stdout.write(text[start : start + OUT_CHUNK])
        sys.stdout.flush()


def cmd_metrics(client: Client, args: argparse.Namespace) -> int:
    """A job's steps and epochs: a summary, or every step as CSV."""
    if args.csv:  # the API's CSV: one row per step, an epoch's accuracy on its last step
        write_out(client.metrics_csv(args.job_id))
        return EXIT_OK
    metrics = client.metrics(args.job_id)
    steps, epochs = metrics["steps"], metrics["epochs"]
    print(f"job {metrics['job_id']}: {metrics['status']}, {len(steps)} steps recorded")
    if steps:
        print(f"loss: first {steps[0]['loss']:.4f}, last {steps[-1]['loss']:.4f}")
    for e in epochs:
        print(
            f"epoch {e['epoch']}: test accuracy {_percent(e['accuracy'])} "
            f"after {e['examples_seen']} images"
        )
    return EXIT_OK


def _read_images(names: list[str]) -> list[tuple[str, bytes]]:
    if names.count("-") > 1:
        raise UsageError("standard input (-) can be read once only")
    images = []
    for name in names:
        if name == "-":
            images.append(("stdin", sys.stdin.buffer.read()))
            continue
        path = Path(name)
        # A name that is not UTF-8 (its bytes as surrogates) cannot go in the form: replaced.
        sent_as = path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        try:
            images.append((sent_as, path.read_bytes()))
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return images


def _print_prediction(answer: dict[str, Any]) -> None:
    probabilities = answer["probabilities"]
    print(
        f"digit {answer['digit']} ({_percent(probabilities[answer['digit']], 1)}) "
        f"by the model of job {answer['job_id']}"
    )
    for digit, p in enumerate(probabilities):
        bar = "█" * round(p * BAR_WIDTH)
        mark = " ←" if digit == answer["digit"] else ""
        print(f"  {digit} {bar:<{BAR_WIDTH}} {_percent(p, 1):>7}{mark}")


def cmd_predict(client: Client, args: argparse.Namespace) -> int:
    """The digit in each image file ('-' reads standard input)."""
    images = _read_images(args.images)
    try:
        answer = client.predict(images, job_id=args.job, model=args.model)
    except ApiError as exc:
        # The API names the n-th of several images files[n]: say which file that is.
        exc.message = re.sub(
            r"\bfiles\[(\d+)\]",
            lambda m: images[int(m[1])][0] if int(m[1]) < len(images) else m[0],
            exc.message,
        )
        raise
    if args.json:
        print(json.dumps(answer))
    elif len(images) == 1:
        _print_prediction(answer)
    else:
        width = max(len(name) for name, _ in images)
        for (name, _), prediction in zip(images, answer["predictions"], strict=True):
            p = prediction["probabilities"][prediction["digit"]]
            print(f"{name:<{width}}  digit {prediction['digit']} ({_percent(p, 1)})")
        print(f"by the model of job {answer['job_id']}", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    """Cancel a job, or a sweep (``--sweep``)."""
    if args.sweep:
        sweep = client.cancel_sweep(args.job_id)
        print(f"sweep {sweep['id']} is {sweep['status']}: its running trials stop shortly")
        return EXIT_OK
    job = client.cancel(args.job_id)
    if job["status"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:
        print(f"job {job['id']} is {job['status']}: its worker stops it within a second or so")
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    """Delete a job that has ended (its metrics and checkpoint go with it), or a sweep with
    its trials (``--sweep``)."""
    client.delete(args.job_id, sweep=args.sweep)
    print(f"deleted {'sweep ' if args.sweep else ''}{args.job_id}")
    return EXIT_OK


CLIENT_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "sweep": cmd_sweep,
    "sweeps": cmd_sweeps,
    "metrics": cmd_metrics,
    "predict": cmd_predict,
    "cancel": cmd_cancel,
    "delete": cmd_delete,
}


def _print_api_error(exc: ApiError) -> None:
    """The one way an API error is shown: its message, then each detail it does not already
    say (a validation error's message lists its fields, so they are not printed twice)."""
    print(f"error: {exc.message}", file=sys.stderr)
    for detail in exc.details:
        if "loc" in detail and "msg" in detail:
            where = ".".join(str(p) for p in detail["loc"] if p != "body")
            line = f"{where}: {detail['msg']}"
            if line not in exc.message:
                print(f"  {line}", file=sys.stderr)


def _run_client(
    handler: Callable[[Client, argparse.Namespace], int],
    args: argparse.Namespace,
    http: httpx.Client | None,
) -> int:
    client = Client(args.url, api_key=args.api_key, http=http)
    try:
        return handler(client, args)
    except UsageError as exc:
        print(f"mnist-service {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as exc:
        _print_api_error(exc)
        return EXIT_API_ERROR
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        # A 200 whose JSON lacks what the service always sends, or holds what it never does
        # (a date that is none, a digit out of range): another API at this URL.
        missing = f" (no {exc})" if isinstance(exc, KeyError) else ""
        print(
            f"error: {client.url} answered JSON the MNIST service does not send{missing}; "
            f"check --url or ${URL_ENV}",
            file=sys.stderr,
        )
        return EXIT_API_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if http is None:
            client.close()


def _run(argv: Sequence[str] | None, http: httpx.Client | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = CLIENT_COMMANDS.get(args.command)
    if handler is not None:
        check_client_options(parser, args)
        return _run_client(handler, args, http)
    if args.command == "api":
        from service.__main__ import main as api_main

        return api_main()
    if args.command == "worker":
        from workers.__main__ import main as worker_main

        return worker_main(["--concurrency", str(args.concurrency)])
    from service.cli import server

    if args.command == "migrate":
        return server.migrate(force=args.force)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return server.run_all(args.workers)


def main(argv: Sequence[str] | None = None, *, http: httpx.Client | None = None) -> int:
    """Parse the command line and run a subcommand; ``http`` replaces the HTTP client (tests).

    Output piped into a reader that stops early (``| head``) ends the command quietly, by the
    Python documentation's recipe: the rest of the output goes to /dev/null, so the flush at
    exit does not fail again, and the exit status is a shell's for SIGPIPE.
    """
    try:
        try:
            return _run(argv, http)
        finally:  # argparse's --help exits too; a broken pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # no file descriptor (stdout replaced, as in tests)
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
