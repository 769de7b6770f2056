"""Metrics polling: reading a long series from the API, and polling it while a job trains.

The series is written the way workers write it (``record_progress`` in flush-sized batches),
and read through the service as deployed (``python -m service``), over real HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.env import clients_where, make_workspace
from benchmarks.floor import cpu_mnist
from benchmarks.jobs import FLUSH_ROWS, write_series
from benchmarks.poll_costs import poll_costs
from benchmarks.polled_counts import count_rows, counts_under_polls, least_text, polling
from benchmarks.polled_jobs import POLL_RATE_HZ, POLLERS, polled_jobs
from benchmarks.predict import PRODUCTION_SETTINGS, server
from benchmarks.procs import cpu_seconds
from benchmarks.profiling import Profile, py_spy, read_py_spy, share_rows
from benchmarks.report import Section
from benchmarks.series_clients import PROBE_PERIOD_S, healthz_under_reads, read_whole_series
from benchmarks.stats import Series, fmt, median, percentile, verdict
from benchmarks.stream_followers import crowd_floor, followed_jobs
from benchmarks.watching_text import (
    SHORT_SERIES_STEPS,
    SLOWDOWN_GOAL,
    cold_polls_para,
    counts_para,
    crowd_floor_para,
    floor_para,
    slowdown_cell,
)
from service.api.routes.jobs import MAX_STEPS_PAGE
from service.store.engines import make_engine, make_sessionmaker
from workers.tuning.threads import usable_cores

SERIES_STEPS = 50_000
PAGE_STEPS = 10_000  # one page of the figure "one 10,000-step page"
WHOLE_GOAL_MS = 100.0
TAIL_GOAL_MS = 5.0
HEALTH_READERS = 2  # clients reading the whole series while /healthz is probed
HEALTH_SECONDS = 5.0
HEALTH_GOAL_MS = 50.0
CROWD_STREAMS = 200  # streams of one job, opened together: the goal's other reading
NULL_SERVER = "the server that does next to nothing"
NULL_SERVER_LABEL = f"the default, polling {NULL_SERVER} (below)"
METRICS_PARTS = {
    "steps: the driver's fetch and the rows' dicts (metric_repo.read_steps)": "read_steps (",
    "other SQL (SQLAlchemy: the job, its epochs)": "/sqlalchemy/",
    "dicts → JSON (service/domain/jobs.py, orjson)": "encode_metrics (",
    "validation (pydantic)": "/pydantic/",
    "thread-pool hand-offs (anyio, threading)": "/anyio/",
    "FastAPI / Starlette": "/starlette/",
    "HTTP server (uvicorn)": "/uvicorn/",
}


def timed_calls(name: str, fn: Callable[[], object], n: int, pid: int) -> tuple[Series, float]:
    """``n`` calls of ``fn``: their wall times (ms), and the server's CPU ms per call."""
    series = Series(name, "ms")
    cpu_before = cpu_seconds(pid)
    for _ in range(n):
        started = time.perf_counter()
        fn()
        series.add((time.perf_counter() - started) * 1000)
    return series, (cpu_seconds(pid) - cpu_before) / n * 1000


@dataclass
class MetricsResult:
    """The goal figures."""

    whole_ms: float
    healthz_p95_ms: float
    tail_ms: float
    slowdown: float


def run_metrics(section: Section, root: Path, *, runs: int, profile: bool) -> MetricsResult:
    """Measure and write the metrics section."""
    ws = make_workspace(root)
    engine = make_engine(ws.database_url)
    sessions = make_sessionmaker(engine)
    try:
        started = time.perf_counter()
        job_id = write_series(sessions, SERIES_STEPS)
        write_s = time.perf_counter() - started
        # Every stream of a crowd may land on one API process: its cap must not refuse them.
        production = {
            **ws.env(),
            **PRODUCTION_SETTINGS,
            "MNIST_MAX_EVENT_STREAMS": str(CROWD_STREAMS),
        }
        with server(["-m", "service"], production, root / "api.log") as (url, pid):
            client = httpx.Client(base_url=url, timeout=30)
            if read_whole_series(client, job_id) != SERIES_STEPS:
                raise RuntimeError("the API did not return the whole series")
            reads = max(runs, 5) * 2
            whole, whole_cpu = timed_calls(
                "whole series", lambda: read_whole_series(client, job_id), reads, pid
            )
            page, page_cpu = timed_calls(
                "one 10,000-step page",
                lambda: client.get(
                    f"/jobs/{job_id}/metrics", params={"after_step": 20_000, "limit": PAGE_STEPS}
                ).raise_for_status(),
                reads,
                pid,
            )
            tail, tail_cpu = timed_calls(
                "after_step poll near the end",
                lambda: client.get(
                    f"/jobs/{job_id}/metrics", params={"after_step": SERIES_STEPS - 10}
                ).raise_for_status(),
                300,
                pid,
            )
            short_id = write_series(sessions, SHORT_SERIES_STEPS)
            costs = poll_costs(url, pid, short_id, rate_hz=POLL_RATE_HZ, connections=POLLERS)
            prof: Profile | None = None
            if profile:
                out = root / "metrics-profile.txt"
                spy = py_spy(pid, 5, out, subprocesses=True)
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    read_whole_series(client, job_id)
                prof = read_py_spy(spy, out)

            # Polling while a job trains, with the default threads (auto), one and two.
            configs = [
                polled_jobs(
                    ws,
                    sessions,
                    url,
                    pid,
                    runs=runs,
                    label=f"MNIST_TORCH_THREADS={threads}"
                    + (" (default)" if threads == "auto" else ""),
                    log=root / f"worker-{threads}.log",
                    torch_threads=threads,
                )
                for threads in ("auto", "1", "2")
            ]
            mnist = cpu_mnist()
            counts = [
                counts_under_polls(
                    mnist, lambda: polling(url, short_id), rounds=runs, label="the API"
                )
            ]
            # The floor: the same polls answered by a server that does nothing.
            with server(["-m", "benchmarks.null_server"], production, root / "null-server.log") as (
                null_url,
                null_pid,
            ):
                floor = polled_jobs(
                    ws,
                    sessions,
                    null_url,
                    null_pid,
                    runs=runs,
                    label=NULL_SERVER_LABEL,
                    log=root / "worker-null-server.log",
                    torch_threads="auto",
                )
                counts.append(
                    counts_under_polls(
                        mnist, lambda: polling(null_url, short_id), rounds=runs, label=NULL_SERVER
                    )
                )
            # The same watchers following the job's event stream instead.
            followed, crowd = (
                followed_jobs(ws, sessions, url, pid, runs=runs, streams=streams)
                for streams in (POLLERS, CROWD_STREAMS)
            )
            # The crowd's floor: its streams written by a server that does nothing.
            floor_log = root / "null-streams.log"
            crowd_low = crowd_floor(ws, sessions, crowd, production, floor_log, runs=runs)
            client.close()
        health = healthz_under_reads(
            ws.env(),
            job_id,
            steps=SERIES_STEPS,
            readers=HEALTH_READERS,
            seconds=HEALTH_SECONDS,
            log=root / "api-1.log",
        )
    finally:
        engine.dispose()

    default, one_thread, two_threads = configs
    slowdown = default.slowdown
    tail_p50 = percentile(tail.values, 50)
    health_p95 = percentile(health.reading.values, 95)
    section.para(
        f"A succeeded job with {SERIES_STEPS:,} steps, written by `record_progress` in "
        f"batches of {FLUSH_ROWS} ({write_s:.1f} s), read over HTTP with one client from the "
        "service as the README's production command runs it (`MNIST_API_WORKERS=2 "
        "MNIST_ACCESS_LOG=false python -m service`; the access log's line per request would "
        "cost each poll about a fifth more CPU). The whole series is every page of "
        "`GET /jobs/{id}/metrics` at the "
        f"largest page ({MAX_STEPS_PAGE:,} steps) followed to the end (an empty page), as a "
        "client reads it."
    )
    section.table(
        ["figure", "p50", "p90", "the API's CPU per call", "runs"],
        [
            [
                s.name,
                fmt(percentile(s.values, 50), "ms"),
                fmt(percentile(s.values, 90), "ms"),
                fmt(cpu, "ms"),
                len(s.values),
            ]
            for s, cpu in ((whole, whole_cpu), (page, page_cpu), (tail, tail_cpu))
        ],
    )
    section.para(
        "The server's other requests while series are read: a server of one process "
        "(`MNIST_API_WORKERS=1`, so that every request shares its event loop) answers "
        f"`GET /healthz` every {PROBE_PERIOD_S * 1000:.0f} ms on a kept-alive connection, idle "
        f"and while {HEALTH_READERS} client processes each read the whole series over and over "
        f"({health.series_read} whole series in {HEALTH_SECONDS:.0f} s)."
    )
    section.table(
        ["`/healthz`", "p50", "p95", "max", "probes"],
        [
            [
                name,
                fmt(percentile(s.values, 50), "ms"),
                fmt(percentile(s.values, 95), "ms"),
                fmt(max(s.values), "ms"),
                len(s.values),
            ]
            for name, s in (
                ("idle server", health.idle),
                (f"while {HEALTH_READERS} clients read the whole series", health.reading),
            )
        ],
    )
    section.para(
        f"Polling during training: a worker process (`python -m workers`, data warm) runs "
        f"10,000-image × 3-epoch jobs, one left alone and one polled in each of {runs} rounds "
        "(in alternating order), the polled one by a client at "
        f"{POLL_RATE_HZ:.0f} requests/s in all ({POLLERS} keep-alive connections, each a wrk "
        f"process asking for the steps after the last one it saw: the pollers run "
        f"{clients_where()}, and a client in C costs them least, as one on another machine "
        "would cost them nothing); job time is claim → finish from the database. The slowdown "
        "is the median of each round's polled job against its quiet one (paired, so that the "
        "machine's drift moves both jobs of a pair), with an order-statistics interval and the "
        "chance that it holds the median (at least 95% from 6 rounds on); the CPU columns are "
        "per poll while the jobs were polled (all rounds' CPU over all their polls), the polled "
        "server's processes' (the API's; the floor's in the last row) and the pollers'. The "
        "last column is what the polls' CPU alone would cost a job that kept "
        f"all {usable_cores()} cores busy: their share s of a core leaves it cores − s "
        "(`benchmarks/poll_costs.py`)."
    )
    section.table(
        [
            "worker",
            "job, no polls",
            "job, 200 polls/s",
            "slowdown (paired)",
            "polls/s",
            "poll p50",
            "server CPU/poll",
            "wrk CPU/poll",
            "polls' CPU alone",
        ],
        [
            [
                c.label,
                f"{fmt(c.quiet.median, 's')} ({fmt(c.quiet.spread[0])}–{fmt(c.quiet.spread[1])})",
                f"{fmt(c.polled.median, 's')} "
                f"({fmt(c.polled.spread[0])}–{fmt(c.polled.spread[1])})",
                slowdown_cell(c),
                fmt(median(c.achieved)),
                fmt(median(c.poll_p50), "ms"),
                fmt(c.cpu_per_poll_ms(c.api_cpu_s), "ms"),
                fmt(c.cpu_per_poll_ms(c.client_cpu_s), "ms"),
                f"{c.share_slowdown:+.1%}",
            ]
            for c in (*configs, floor)
        ],
    )
    section.para(
        "The two goals pull apart on 2 cores: a job at 2 threads needs both cores, so the "
        "polls' CPU (the API's and the client's, in the table) comes "
        "out of the job; a job at 1 thread leaves a core to the polls but is slower when "
        "nothing else runs (the floor at 1 thread against 2, in the training section). "
        f"With MNIST_TORCH_THREADS=1 the polls slow a job by {one_thread.slowdown:+.1%}, with 2 "
        f"by {two_threads.slowdown:+.1%}. " + cold_polls_para(costs, default)
    )
    section.para(floor_para(floor, default))
    section.para(counts_para(counts[0], counts[1]))
    section.table(
        ["polled server", "threads", "step, no polls", "step, polled", "slowdown", "polls/s"],
        count_rows(counts),
    )
    section.para(
        f"The same {POLLERS} watchers following the job's event stream instead "
        "(`GET /jobs/{id}/events`, opened as the job is claimed by one client process for the "
        f"run {clients_where()}, `benchmarks/stream_client.py`, each read to its end at the "
        "job's final event; the default worker, the same alternation): a stream is woken by "
        f"each write of its job rather than asking {POLL_RATE_HZ / POLLERS:.0f} times a "
        "second. The CPU columns are per stream per job, the server's processes' (the API's; "
        "the floor's in the last row) and the client's. The second row is a crowd: "
        f"{CROWD_STREAMS} streams of each followed job (the server run with "
        f"MNIST_MAX_EVENT_STREAMS={CROWD_STREAMS}, as every one may land on one of its "
        "processes)."
    )
    section.table(
        [
            "watchers",
            "job, alone",
            "job, followed",
            "slowdown (paired)",
            "server CPU",
            "client CPU",
        ],
        [
            [
                f"{jobs.streams} event streams{who}",
                fmt(jobs.quiet.median, "s"),
                fmt(jobs.followed.median, "s"),
                slowdown_cell(jobs),
                fmt(jobs.per_stream_ms(jobs.api_cpu_s), "ms"),
                fmt(jobs.per_stream_ms(jobs.client_cpu_s), "ms"),
            ]
            for jobs, who in ((followed, ""), (crowd, ""), (crowd_low, f", {NULL_SERVER}"))
        ],
    )
    section.para(crowd_floor_para(crowd_low, crowd))
    section.goal_table(
        [
            [
                f"whole series p50 ≤ {WHOLE_GOAL_MS:.0f} ms",
                fmt(whole.median, "ms"),
                verdict(whole.median <= WHOLE_GOAL_MS),
            ],
            [
                f"`/healthz` p95 while {HEALTH_READERS} clients read a {SERIES_STEPS:,}-step "
                f"series in full ≤ {HEALTH_GOAL_MS:.0f} ms",
                fmt(health_p95, "ms"),
                verdict(health_p95 <= HEALTH_GOAL_MS),
            ],
            [
                f"after_step poll near the end p50 ≤ {TAIL_GOAL_MS:.0f} ms",
                fmt(tail_p50, "ms"),
                verdict(tail_p50 <= TAIL_GOAL_MS),
            ],
            [
                f"{POLL_RATE_HZ:.0f} polls/s slow a job by ≤ {SLOWDOWN_GOAL:.0%}",
                f"{slowdown_cell(default)}, {default.label}; a server that does next to "
                f"nothing, the pollers included: {slowdown_cell(floor)}; the least any thread "
                f"count could do (the steps above): {least_text(counts[0])}",
                verdict(slowdown <= SLOWDOWN_GOAL),
            ],
            *(
                [
                    f"{jobs.streams} open event streams of one job ({who}) slow it by "
                    f"≤ {SLOWDOWN_GOAL:.0%}",
                    f"{slowdown_cell(jobs)}, {default.label}{floor_text}",
                    verdict(jobs.slowdown <= SLOWDOWN_GOAL),
                ]
                for jobs, who, floor_text in (
                    (followed, "the same watchers", ""),
                    (
                        crowd,
                        "a crowd",
                        "; a server that does next to nothing, the client included: "
                        + slowdown_cell(crowd_low),
                    ),
                )
            ),
        ],
    )
    if prof is not None:
        section.para(f"Profile of the API reading whole series (py-spy, {prof.samples} samples):")
        section.table(
            ["where the server's time goes", "share"],
            share_rows(prof.inclusive_shares(METRICS_PARTS).items()),
        )
        section.table(["hottest functions (self time)", "share"], share_rows(prof.self_shares(6)))
    return MetricsResult(whole.median, health_p95, tail_p50, slowdown)
