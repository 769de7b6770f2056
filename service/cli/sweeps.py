"""``mnist-service sweep`` and ``sweeps``: start a sweep from the command line (checked by the
API's own models and expansion first, :func:`service.schemas.sweeps.expand`), follow its trials
in a live table, list sweeps."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pydantic import ValidationError

from service.cli import EXIT_INTERRUPTED
from service.cli.client import ApiError, Client, Patience
from service.cli.parser import EXIT_JOB_FAILED, EXIT_OK, UsageError
from service.errors import InvalidInput
from service.schemas.sweeps import SWEEP_TRIALS_CEILING, SweepCreate, expand
from service.status import SweepStatus

POLL_S = 0.5  # how often --watch reads the sweep
_GATHERED = ("--param", "--grid", "--space")  # the options that name fields


def _value(text: str) -> Any:
    """A value as JSON reads it (1, 0.5, 1e-4, null), else the text (the model refuses it)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pair(option: str, item: str) -> tuple[str, str]:
    field, sep, rest = item.partition("=")
    if not sep or not field or not rest:
        raise UsageError(f"argument {option}: {item!r} is not FIELD=VALUE")
    return field, rest


def _fields(args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    """Each option's ``FIELD=VALUE`` pairs, a field named once in all of them: a second
    ``--grid seed=...`` (or a ``--param`` and a ``--grid`` of one field) was silently dropped
    but for one, so the sweep ran other trials than the command line asked for."""
    pairs = {o: [_pair(o, item) for item in getattr(args, o[2:])] for o in _GATHERED}
    first: dict[str, str] = {}
    for option, items in pairs.items():
        for field, value in items:
            if field in first:
                raise UsageError(
                    f"argument {option}: field {field!r} is named twice "
                    f"({first[field]} and {option} {field}={value}): give it once"
                )
            first[field] = f"{option} {field}={value}"
    return pairs


def _body(args: argparse.Namespace) -> dict[str, Any]:
    pairs = _fields(args)
    body: dict[str, Any] = {"params": {f: _value(v) for f, v in pairs["--param"]}}
    if args.grid:
        body["grid"] = {f: [_value(v) for v in values.split(",")] for f, values in pairs["--grid"]}
    if args.random_trials is not None or args.space:
        space: dict[str, Any] = {}
        for field, spec in pairs["--space"]:
            kind, _, rest = spec.partition(":")
            values = [_value(v) for v in rest.split(":")] if rest else []
            space[field] = {kind: values}
        body["random"] = {"trials": args.random_trials, "space": space}
        if args.random_seed is not None:
            body["random"]["seed"] = args.random_seed
    if args.promote is not None:
        body["promote"] = args.promote
    return body


def _option(loc: list[Any]) -> str:
    """The command-line option a field of the body comes from."""
    head, rest = (loc[0], loc[1:]) if loc else ("", [])
    field = next((str(p) for p in rest if isinstance(p, str) and p != "[key]"), "")
    if head == "random" and rest[:1] == ["trials"]:
        return "--random-trials"
    if head == "random" and rest[:1] == ["seed"]:
        return "--random-seed"
    names = {"params": "--param", "grid": "--grid", "promote": "--promote"}
    option = names.get(str(head), "--space" if head == "random" else "")
    if head == "random" and rest[:1] == ["space"]:
        field = str(rest[1]) if len(rest) > 1 else ""
    if not option:
        return "--grid or --random-trials"
    return f"{option} {field}".rstrip() if option != "--promote" else option


def checked_body(args: argparse.Namespace) -> dict[str, Any]:
    """The body of ``POST /sweeps`` from the command line, checked as the API checks it (its
    models, then its expansion into trials): a bad value is a bad command line, named by option."""
    body = _body(args)
    try:
        expand(SweepCreate.model_validate(body), max_trials=SWEEP_TRIALS_CEILING)
    except ValidationError as exc:
        problems = [
            f"argument {_option(list(e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        ]
        raise UsageError("; ".join(problems)) from None
    except InvalidInput as exc:
        loc = list((exc.details or [{}])[0].get("loc", ["body"]))[1:]
        raise UsageError(f"argument {_option(loc)}: {exc.message}") from None
    return body


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_table(sweep: dict[str, Any]) -> list[str]:
    """The sweep's trials as lines: what each varies, its status, epoch and accuracy."""
    varied = list(sweep["grid"] or (sweep["random"] or {}).get("space", {}))
    rows: list[tuple[str, ...]] = [("JOB", *(n.upper() for n in varied), "STATUS", "EPOCH", "ACC")]
    best = (sweep.get("best") or {}).get("job_id")
    for t in sweep["trials"]:
        mark = " *" if t["job_id"] == best else ""
        rows.append(
            (
                t["job_id"],
                *(
                    f"{t['params'][n]:.4g}"
                    if isinstance(t["params"][n], float)
                    else str(t["params"][n])
                    for n in varied
                ),
                t["status"],
                f"{t['epoch']}/{t['params']['epochs']}",
                _percent(t["accuracy"]) + mark,
            )
        )
    return [f"sweep {sweep['id']}: {sweep['status']}", *_table(rows)]


def watch_sweep(
    client: Client,
    sweep_id: str,
    out: TextIO,
    sleep: Callable[[float], None] = time.sleep,
    patience: Patience | None = None,
) -> dict[str, Any]:
    """Redraw the trial table whenever it changes (in place on a terminal) until the sweep
    ends; the sweep as it ended. An API that is away (restarting) is waited out as a job's
    watch waits it out (:class:`Patience`): the sweep's trials train on meanwhile."""
    shown: list[str] = []
    live = out.isatty()
    patience = patience or Patience(sleep=sleep)
    while True:
        try:
            sweep = client.sweep(sweep_id)
        except ApiError as exc:
            patience.wait_out(exc, f"sweep {sweep_id}", "mnist-service sweeps")
            continue
        patience.answered()
        lines = trial_table(sweep)
        if lines != shown:
            if live and shown:
                out.write(f"\x1b[{len(shown)}F\x1b[J")  # back to the table's top, clear below
            out.write("\n".join(lines) + "\n")
            out.flush()
            shown = lines
        if sweep["status"] != SweepStatus.RUNNING:
            return sweep
        sleep(POLL_S)


def cmd_sweep(client: Client, args: argparse.Namespace) -> int:
    """Queue a sweep (prints its id); with --watch, follow its trials to its end."""
    sweep = client.create_sweep(checked_body(args))
    print(sweep["id"], flush=True)
    if not args.watch:
        return EXIT_OK
    try:
        final = watch_sweep(client, sweep["id"], sys.stderr)
    except KeyboardInterrupt:
        print(
            f"stopped watching; sweep {sweep['id']} goes on "
            f"(stop it with: mnist-service cancel --sweep {sweep['id']})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    best = final.get("best")
    if final["status"] == SweepStatus.SUCCEEDED and best:
        print(
            f"sweep {final['id']} succeeded: best trial {best['job_id']}, "
            f"test accuracy {_percent(best['accuracy'])}"
        )
        return EXIT_OK
    print(f"sweep {final['id']} {final['status']}", file=sys.stderr)
    return EXIT_JOB_FAILED


def cmd_sweeps(client: Client, args: argparse.Namespace) -> int:
    """List the newest sweeps."""
    sweeps = client.sweeps(limit=args.limit)
    if args.json:
        print(json.dumps(sweeps, indent=2))
        return EXIT_OK
    rows: list[tuple[str, ...]] = [("ID", "STATUS", "TRIALS", "ENDED", "BEST", "ACCURACY")]
    for s in sweeps:
        counts = s["trials_by_status"]
        ended = sum(n for status, n in counts.items() if status not in ("queued", "running"))
        best = s.get("best") or {}
        rows.append(
            (
                s["id"],
                s["status"],
                str(sum(counts.values())),
                str(ended),
                best.get("job_id", "-"),
                _percent(best.get("accuracy")),
            )
        )
    for line in _table(rows):
        print(line)
    if not sweeps:
        print("no sweeps yet: mnist-service sweep --grid seed=0,1,2 --watch", file=sys.stderr)
    return EXIT_OK
