"""The HTTP edge: what service/api/edge/protocol.py costs per request, and what it saves.

Two servers of the same service in the same run: ``python -m service`` (the edge's protocol)
and :mod:`benchmarks.plain_uvicorn` (the same, on uvicorn's own httptools protocol). wrk loads
``GET /healthz`` (the cheapest request: the protocol's share is largest there) and a raw-body
predict, round by round. Then, against each server: one request with a 16 MB header, and
2,000 connections stalled in their headers or bodies.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.edge_protocol import REQUESTS, protocol_costs
from benchmarks.env import data_dir, make_workspace
from benchmarks.load import CONNECTIONS, run_wrk
from benchmarks.predict import (
    Measured,
    Target,
    columns,
    digit_png,
    load_once,
    server,
    trained_checkpoint,
)
from benchmarks.procs import cpu_seconds
from benchmarks.report import Section
from benchmarks.stalls import reap, stalled
from benchmarks.stats import fmt, median

WARMUP_S = 1.0
STALLED = 2000
STALL_WATCH_S = 15.0
HUGE_HEADER_BYTES = 16 * 1024 * 1024
ROUTES = [("GET /healthz", "/healthz"), ("POST /predict, raw PNG", "/predict")]
SERVERS = [
    ("edge: `python -m service`", ["-m", "service"]),
    ("plain uvicorn: `python -m benchmarks.plain_uvicorn`", ["-m", "benchmarks.plain_uvicorn"]),
]


@dataclass(frozen=True)
class Abuse:
    """What one server did with a 16 MB header and with stalled connections."""

    huge_status: str
    huge_s: float
    huge_cpu_s: float
    still_open: int


def first_status(port: int, data: bytes, timeout_s: float = 60.0) -> tuple[str, float]:
    """Send ``data`` on a fresh connection; the answer's status (or how it ended) and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
            head = sock.recv(64)
        except OSError as exc:
            return type(exc).__name__, time.monotonic() - started
    status = head.split(b" ", 2)[1].decode() if head else "closed"
    return status, time.monotonic() - started


def stalled_still_open(port: int) -> int:
    """Open :data:`STALLED` connections, half stalled in headers and half in bodies; how many
    the server still holds open :data:`STALL_WATCH_S` seconds later."""
    with stalled(port, STALLED) as selector:
        deadline = time.monotonic() + STALL_WATCH_S
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            reap(selector, min(left, 0.5))
        return len(selector.get_map())


def abuse(url: str, pid: int) -> Abuse:
    """The 16 MB header and the stalled connections against one server."""
    port = int(url.rsplit(":", 1)[1])
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * HUGE_HEADER_BYTES + b"\r\n\r\n"
    cpu_before = cpu_seconds(pid)
    status, seconds = first_status(port, huge)
    cpu = cpu_seconds(pid) - cpu_before
    return Abuse(status, seconds, cpu, stalled_still_open(port))


def run_edge(section: Section, root: Path, *, runs: int, seconds: float) -> None:
    """Measure both servers round by round, then abuse each; write the section."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets
    ws = make_workspace(root)
    trained_checkpoint(ws)  # predict answers with the latest model
    (root / "raw.body").write_bytes(digit_png(data_dir()))
    env = ws.env(access_log="false")
    measured: list[Measured] = []
    abused: dict[str, Abuse] = {}
    with contextlib.ExitStack() as stack:
        pids: dict[str, tuple[str, int]] = {}
        for i, (label, args) in enumerate(SERVERS):
            url, pid = stack.enter_context(server(args, env, root / f"edge{i}.log"))
            pids[label] = (url, pid)
            for what, path in (
                ("GET /healthz", "/healthz"),
                ("POST /predict, raw PNG", "/predict"),
            ):
                target = Target(
                    f"{label}, {what}", what, url + path, root / "raw.body", "image/png", pid
                )
                measured.append(Measured(target))
        for m in measured:
            t = m.target
            run_wrk(t.url, t.body, t.content_type, seconds=WARMUP_S, method=_method(t))
        for r in range(runs):
            for m in measured:
                m.add(*load_once(m.target, seconds, method=_method(m.target)))
                print(
                    f"  edge round {r + 1}/{runs}: {m.target.label}: "
                    f"{m.rps.values[-1]:.0f} req/s p99 {m.p99.values[-1]:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        for label, (url, pid) in pids.items():
            abused[label] = abuse(url, pid)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    costs = protocol_costs(runs)
    _write(section, measured, abused, seconds)
    plain, edge = (median(v) for v in costs.values())
    section.para(
        f"The protocol alone (benchmarks/edge_protocol.py: {REQUESTS:,} keep-alive GETs fed "
        "in this process to an app that answers at once, no network; median of "
        f"{runs} alternating rounds): {fmt(plain, 'µs')} per request with uvicorn's httptools "
        f"protocol, {fmt(edge, 'µs')} with the edge's, {fmt(edge - plain, 'µs')} more: the "
        "layer's own cost, small beside what the service spends per request (server CPU above)."
    )


def _method(target: Target) -> str:
    return target.kind.split()[0]  # the kind is "GET /healthz" or "POST /predict, raw PNG"


def _write(
    section: Section, measured: list[Measured], abused: dict[str, Abuse], seconds: float
) -> None:
    section.para(
        f"wrk (1 thread, {CONNECTIONS} connections, {seconds:.0f} s per run, after a "
        f"{WARMUP_S:.0f} s warm-up), the servers' defaults but the access log; every server on "
        "this machine, wrk's CPU out of the same 2 cores. The plain server is the same "
        "service on uvicorn's own httptools protocol, without the edge's limits."
    )
    half = len(measured) // 2
    plains = [*measured[half:], *measured[half:]]
    rows = [[*m.cells(plain), str(m.errors)] for m, plain in zip(measured, plains, strict=True)]
    section.table([*columns("plain"), "errors"], rows)
    section.table(
        [
            "server",
            "16 MB header: answer",
            "in",
            "server CPU",
            f"of {STALLED:,} stalled connections, open {STALL_WATCH_S:g} s later",
        ],
        [
            [
                label,
                a.huge_status,
                fmt(a.huge_s * 1000, "ms"),
                fmt(a.huge_cpu_s * 1000, "ms"),
                f"{a.still_open:,}",
            ]
            for label, a in abused.items()
        ],
    )
