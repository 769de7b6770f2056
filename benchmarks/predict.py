"""Predict under load: wrk at 32 connections posting a 28×28 PNG to each predict route.

Baseline, in the same run: :mod:`benchmarks.baseline_app` (the simplest FastAPI endpoint, one
uvicorn process). Measured: the service as deployed, ``python -m service`` (what ``make run``
starts), with its default settings. Every route the running service offers is measured: the
multipart upload always, a raw image body when ``POST /predict`` accepts one.
"""

from __future__ import annotations

import contextlib
import io
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.env import Workspace, data_dir, make_workspace
from benchmarks.jobs import run_one_job
from benchmarks.load import CONNECTIONS, LoadResult, multipart_body, run_wrk
from benchmarks.procs import cpu_seconds
from benchmarks.profiling import Profile, py_spy, read_py_spy, share_rows
from benchmarks.report import Section
from benchmarks.stats import Series, fmt, fmt_ratio, median, ratio, verdict
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import Job
from tests.support import free_port, process, wait_for

P99_GOAL_MS = 15.0
RAW_GOAL = 3.0  # × the baseline's requests/s
MULTIPART_GOAL = 2.0
WARMUP_S = 1.0
# The service as `make run` starts it, and as the README's production command runs it.
PRODUCTION = "service, production"
PRODUCTION_SETTINGS = {"MNIST_API_WORKERS": "2", "MNIST_ACCESS_LOG": "false"}
SERVICE_VARIANTS: list[tuple[str, dict[str, str]]] = [
    ("service, `python -m service` (defaults)", {}),
    (
        f"{PRODUCTION}: `MNIST_API_WORKERS=2 MNIST_ACCESS_LOG=false python -m service`",
        PRODUCTION_SETTINGS,
    ),
]
# The floor: the fast lane's work with no service around it (benchmarks/floor_predict_app.py).
FLOOR_CMD = [
    "-m",
    "uvicorn",
    "benchmarks.floor_predict_app:app",
    "--port",
    "{port}",
    "--workers",
    "2",
    "--no-access-log",
    "--log-level",
    "warning",
]
# Where a predict request's CPU goes: the first label found on a sampled stack wins.
PREDICT_PARTS = {
    "multipart parsing (python-multipart)": "/python_multipart/",
    "model forward (torch, batched)": "/torch/",
    "image decode (PIL)": "/PIL/",
    "layout, normalisation (numpy: service/serving/imaging.py)": "/service/serving/imaging.py",
    "the fast lane's own code (service/api/lanes/predict.py)": "/service/api/lanes/predict.py",
    "database (SQLAlchemy)": "/sqlalchemy/",
    "validation, JSON (pydantic)": "/pydantic/",
    "thread-pool hand-offs (anyio, threading)": "/anyio/",
    "FastAPI / Starlette": "/starlette/",
    "HTTP server (uvicorn)": "/uvicorn/",
}


@dataclass(frozen=True)
class Target:
    """One server route to load: what it is, where, and the body to post."""

    label: str
    kind: str  # "multipart" or "raw"
    url: str
    body: Path
    content_type: str
    pid: int  # the server's process (its workers are its children)


@dataclass
class Measured:
    """The runs of one target."""

    target: Target
    rps: Series = field(default_factory=lambda: Series("rps", "req/s"))
    p50: Series = field(default_factory=lambda: Series("p50", "ms"))
    p99: Series = field(default_factory=lambda: Series("p99", "ms"))
    cpu_us: Series = field(default_factory=lambda: Series("server cpu/request", "µs"))
    wrk_cpu_us: Series = field(default_factory=lambda: Series("wrk cpu/request", "µs"))
    errors: int = 0

    def add(self, result: LoadResult, server_cpu_s: float, wrk_cpu_s: float) -> None:
        """Record one run."""
        self.rps.add(result.rps)
        self.p50.add(result.p50_ms)
        self.p99.add(result.p99_ms)
        n = max(result.requests, 1)
        self.cpu_us.add(server_cpu_s / n * 1e6)
        self.wrk_cpu_us.add(wrk_cpu_s / n * 1e6)
        self.errors += result.non_2xx + result.socket_errors

    def cells(self, base: Measured) -> list[str]:
        """This target's row of a results table (:func:`columns`), its rate against ``base``'s."""
        return [
            self.target.label,
            fmt(self.rps.median, "req/s"),
            f"{fmt(self.rps.spread[0])}–{fmt(self.rps.spread[1])}",
            fmt_ratio(ratio(self.rps.median, base.rps.median)),
            fmt(self.p50.median, "ms"),
            fmt(self.p99.median, "ms"),
            fmt(self.cpu_us.median, "µs"),
        ]


def columns(base: str) -> list[str]:
    """The headers of :meth:`Measured.cells`, the rate's ratio against ``base``."""
    return ["target", "requests/s", "min–max", f"× {base}", "p50", "p99", "server CPU/request"]


def digit_png(root: Path) -> bytes:
    """The first MNIST test image as a 28×28 grayscale PNG."""
    from torchvision.datasets import MNIST

    pixels = MNIST(str(root), train=False, download=False).data[0].numpy().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def trained_checkpoint(ws: Workspace) -> Path:
    """Train one quick job with the service's worker; the path of its weights."""
    engine = make_engine(ws.database_url)
    try:
        sessions = make_sessionmaker(engine)
        run = run_one_job(ws.settings(), sessions, seed=0, epochs=1)
        with sessions() as session:
            job = session.get(Job, run.job_id)
            if job is None or job.checkpoint is None:
                raise RuntimeError(f"job {run.job_id} left no checkpoint")
            return ws.checkpoint_dir / job.checkpoint
    finally:
        engine.dispose()


def _serving(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code in (200, 404)
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def server(args: list[str], env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    """``python <args> --port P`` (or MNIST_PORT=P) until it answers; yields (base URL, pid)."""
    port = free_port()
    env = {**env, "MNIST_PORT": str(port), "MNIST_HOST": "127.0.0.1"}
    args = [a.replace("{port}", str(port)) for a in args]
    with (
        process(args, env, log) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server {args} exited:\n{log.read_text()[-3000:]}")
            return _serving(client)

        wait_for(up, timeout_s=120, what=f"{args} to listen")
        yield f"http://127.0.0.1:{port}", proc.pid


def accepts(url: str, body: bytes, content_type: str) -> bool:
    """Whether POSTing this body answers 200 with a digit."""
    try:
        r = httpx.post(url, content=body, headers={"content-type": content_type}, timeout=10)
    except httpx.TransportError:
        return False
    return r.status_code == 200 and "digit" in r.json()


def load_once(
    target: Target, seconds: float, *, method: str = "POST"
) -> tuple[LoadResult, float, float]:
    """One wrk run: its result, the server's CPU seconds and wrk's CPU seconds."""
    cpu_before = cpu_seconds(target.pid)
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_wrk(target.url, target.body, target.content_type, seconds=seconds, method=method)
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (wrk_after.ru_utime - wrk_before.ru_utime) + (
        wrk_after.ru_stime - wrk_before.ru_stime
    )
    return result, cpu_seconds(target.pid) - cpu_before, wrk_cpu


@dataclass
class PredictResult:
    """The goal figures for the summary."""

    rows: list[list[str]]


def run_predict(
    section: Section, root: Path, *, runs: int, seconds: float, profile: bool
) -> PredictResult:
    """Measure every predict target round by round and write the section."""
    ws = make_workspace(root)
    checkpoint = trained_checkpoint(ws)
    png = digit_png(data_dir())
    multipart, multipart_type = multipart_body("file", "digit.png", "image/png", png)
    (root / "multipart.body").write_bytes(multipart)
    (root / "raw.body").write_bytes(png)
    env = ws.env()
    baseline_cmd = ["-m", "uvicorn", "benchmarks.baseline_app:app", "--port", "{port}"]
    raw_available = False
    with contextlib.ExitStack() as stack:
        base_url, base_pid = stack.enter_context(
            server(baseline_cmd, {**env, "BENCH_CHECKPOINT": str(checkpoint)}, root / "base.log")
        )
        targets = [
            Target(
                "baseline: simplest FastAPI endpoint, multipart",
                "multipart",
                f"{base_url}/predict",
                root / "multipart.body",
                multipart_type,
                base_pid,
            ),
        ]
        for i, (label, settings) in enumerate(SERVICE_VARIANTS):
            url, pid = stack.enter_context(
                server(["-m", "service"], {**env, **settings}, root / f"svc{i}.log")
            )
            targets.append(
                Target(
                    f"{label}, multipart",
                    "multipart",
                    f"{url}/predict",
                    root / "multipart.body",
                    multipart_type,
                    pid,
                )
            )
            if accepts(f"{url}/predict", png, "image/png"):
                raw_available = True
                targets.append(
                    Target(
                        f"{label}, raw image body",
                        "raw",
                        f"{url}/predict",
                        root / "raw.body",
                        "image/png",
                        pid,
                    )
                )
        floor_url, floor_pid = stack.enter_context(
            server(FLOOR_CMD, {**env, "BENCH_CHECKPOINT": str(checkpoint)}, root / "floor.log")
        )
        targets.append(
            Target(
                "floor: the lane's work alone, bare ASGI (2 uvicorn processes), raw image body",
                "floor",
                f"{floor_url}/predict",
                root / "raw.body",
                "image/png",
                floor_pid,
            )
        )
        for t in targets:
            if t.kind == "multipart" and not accepts(t.url, multipart, multipart_type):
                raise RuntimeError(f"{t.label} does not answer a multipart PNG with a digit")
        measured = [Measured(t) for t in targets]
        for t in targets:
            run_wrk(t.url, t.body, t.content_type, seconds=WARMUP_S)
        for r in range(runs):
            for m in measured:
                m.add(*load_once(m.target, seconds))
                print(
                    f"  predict round {r + 1}/{runs}: {m.target.label}: "
                    f"{m.rps.values[-1]:.0f} req/s p99 {m.p99.values[-1]:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        profiles: dict[str, Profile | None] = {}
        if profile:
            # The baseline and the production configuration: what limits each.
            for m in measured:
                if m.target.pid not in (base_pid, pid):
                    continue
                out = root / f"{m.target.kind}-{m.target.pid}.txt"
                spy = py_spy(m.target.pid, seconds, out, subprocesses=True)
                run_wrk(m.target.url, m.target.body, m.target.content_type, seconds=seconds + 1)
                profiles[m.target.label] = read_py_spy(spy, out)
    _write(section, measured, raw_available, profiles, seconds)
    return PredictResult([])


def _write(
    section: Section,
    measured: list[Measured],
    raw_available: bool,
    profiles: dict[str, Profile | None],
    seconds: float,
) -> None:
    base = measured[0]
    section.para(
        f"wrk (1 thread, {CONNECTIONS} connections, {seconds:.0f} s per run, after a "
        f"{WARMUP_S:.0f} s warm-up) posting a 28×28 PNG of an MNIST digit; every server on "
        "this machine, so wrk's own CPU comes out of the same 2 cores. CPU per request is the "
        "server's processes' user+system time (from /proc) over the requests served."
    )
    rows = [[*m.cells(base), fmt(m.wrk_cpu_us.median, "µs"), str(m.errors)] for m in measured]
    section.table([*columns("baseline"), "wrk CPU/request", "errors"], rows)
    goals = []
    production = next(m.target.pid for m in measured if m.target.label.startswith(PRODUCTION))
    for m in (m for m in measured if m.target.pid == production):
        goal = RAW_GOAL if m.target.kind == "raw" else MULTIPART_GOAL
        times = ratio(m.rps.median, base.rps.median)
        goals.append(
            [
                f"{m.target.kind} ≥ {goal:.0f}× baseline, p99 ≤ {P99_GOAL_MS:.0f} ms",
                f"{fmt_ratio(times)}, p99 {fmt(m.p99.median, 'ms')}",
                verdict(times >= goal and m.p99.median <= P99_GOAL_MS and m.errors == 0),
            ]
        )
    if not raw_available:
        goals.append(
            [
                f"raw body ≥ {RAW_GOAL:.0f}× baseline, p99 ≤ {P99_GOAL_MS:.0f} ms",
                "this build's `POST /predict` takes no raw image body (multipart only)",
                "not measured",
            ]
        )
    section.goal_table(goals)
    floor = next((m for m in measured if m.target.kind == "floor"), None)
    raw = next((m for m in measured if m.target.pid == production and m.target.kind == "raw"), None)
    if floor is not None and raw is not None:
        section.para(
            f"How far from the limit: the production raw route served "
            f"{ratio(raw.rps.median, floor.rps.median):.0%} of the floor's requests/s "
            f"({fmt(raw.rps.median, 'req/s')} vs {fmt(floor.rps.median, 'req/s')}), at "
            f"{fmt(raw.cpu_us.median, 'µs')} of server CPU per request against the floor's "
            f"{fmt(floor.cpu_us.median, 'µs')}: the difference is what the service's features "
            "cost per request (routing to the lane, request ids, metrics, API-key and body-limit "
            "checks, model resolution). The floor itself is bound by the 2 cores it shares with "
            "wrk."
        )
    for label, prof in profiles.items():
        if prof is None:
            continue
        section.para(f"Profile of *{label}* under the same load (py-spy, {prof.samples} samples):")
        shares = prof.inclusive_shares(PREDICT_PARTS)
        section.table(["where the server's time goes", "share"], share_rows(shares.items()))
        section.table(["hottest functions (self time)", "share"], share_rows(prof.self_shares(6)))
    _ = median
