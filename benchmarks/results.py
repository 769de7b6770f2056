"""Time to result: what a user waits for, from ``POST /jobs`` to seeing the job succeed.

The service runs as the README starts it (``mnist-service run --workers 1``: the API and one
worker, each its own process) on SQLite and on PostgreSQL; a client submits the tutorial's
default job and polls it, or follows its event stream. Each figure is set against the floor
(the bare eager loop for the same job, :mod:`benchmarks.floor`) measured in the same rounds,
in this process, while the worker waits for its next job.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.floor import Floors, floor_data, floor_threads_text, thread_count
from benchmarks.poll_costs import share_slowdown
from benchmarks.procs import tree_cpu_seconds, tree_cpu_used
from benchmarks.report import Section
from benchmarks.result_clients import CHECK_BACK_S, follow_to_result, live_delays, poll_to_result
from benchmarks.result_service import (
    database,
    database_server_pid,
    databases_here,
    idle_shares,
    logged_claims,
    service,
    thread_counts_of,
)
from benchmarks.stats import Series, fmt, fmt_ratio, median, percentile, ratio, verdict
from service.schemas import JobCreate
from service.settings import Settings
from service.store import wakeups
from service.store.engines import make_engine, read_engine
from workers.data import Mnist
from workers.tuning.threads import usable_cores

RESULT_GOAL = 1.5  # POST → result seen, ÷ the floor
WORKER_GOAL = 1.2  # started_at → finished_at, ÷ the floor
CLAIM_P50_GOAL_MS, CLAIM_P99_GOAL_MS = 10.0, 50.0
LIVE_GOAL_MS = 100.0
IDLE_GOAL = 0.01  # share of one core
SERVER_FIGURE = "the database server's CPU over a job left alone (every process of the server)"
POLL_INTERVAL_S = float(Settings.model_fields["poll_interval_s"].default)


def shares(steps_at: Counter[int]) -> str:
    """The share of steps at each thread count, as the worker's log gave them, the most first:
    "2 threads 96%, 1 thread 4%" (empty where the count was fixed)."""
    total = sum(steps_at.values())
    return ", ".join(
        f"{thread_count(n)} {steps / total:.0%}" for n, steps in steps_at.most_common()
    )


@dataclass
class Backend:
    """A measured run of the service on one database."""

    name: str
    first_job_s: float = 0.0  # a fresh worker's first job, POST → succeeded (polling)
    first_worker_s: float = 0.0  # ...and its started_at → finished_at
    polled: Series = field(default_factory=lambda: Series("polling", "s"))
    followed: Series = field(default_factory=lambda: Series("events", "s"))
    claim_ms: list[float] = field(default_factory=list)  # POST sent → claimed
    queued_claim_ms: list[float] = field(default_factory=list)  # created_at → seen claimed
    logged_claim_ms: list[float] = field(default_factory=list)  # created_at → claimed (goal)
    worker: Series = field(default_factory=lambda: Series("worker", "s"))  # watched jobs
    alone: Series = field(default_factory=lambda: Series("worker, left alone", "s"))
    live_ms: list[float] = field(default_factory=list)
    floors: Floors = field(default_factory=Floors)
    idle: dict[str, float] = field(default_factory=dict)  # process → share of a core
    server_cpu_s: list[float] = field(default_factory=list)  # the database server's, per job
    alone_steps_at: Counter[int] = field(default_factory=Counter)  # their steps by thread count

    def alone_threads(self) -> str:
        """The share of the jobs left alone's steps at each thread count (:func:`shares`)."""
        return shares(self.alone_steps_at)

    @property
    def floor_s(self) -> float:
        """The fastest thread count's median floor."""
        return self.floors.seconds

    def server_cpu(self) -> str | None:
        """The database server's CPU over a job left alone (the median), and what it would cost
        a job that kept every core busy (:func:`benchmarks.poll_costs.share_slowdown`); None
        where no server was measured."""
        if not self.server_cpu_s:
            return None
        cpu_s = median(self.server_cpu_s)
        share = share_slowdown(cpu_s, self.alone.median, usable_cores())
        return f"{fmt(cpu_s * 1000, 'ms')}, {share:+.1%} of a job that keeps the cores busy"


def measure_backend(
    kind: str,
    root: Path,
    floor_data: Mnist,
    params: dict[str, Any],
    *,
    rounds: int,
    idle_s: float,
    data_root: Path,
) -> Backend:
    """One fresh service on a fresh database: a first job, then ``rounds`` rounds of (floor at
    each thread count, a polled job, a followed job, a followed job whose steps are watched,
    a job left alone), then the idle processes' CPU."""
    result = Backend(kind)
    job = JobCreate.model_validate(params)
    timeout_s = 300.0
    phases = random.Random(0)

    def arrive() -> None:
        # A user submits at any moment, not in step with the worker's polls: each job is sent
        # after a random pause of up to one poll interval.
        time.sleep(phases.uniform(0, POLL_INTERVAL_S))

    with (
        database(kind, root) as url,
        service(url, root, data_root) as svc,
        wakeups.listen(url, [wakeups.JOB_PROGRESS], enabled=True) as heard,
    ):
        # The watcher only reads, DEFERRED on SQLite: its reads never take the write lock the
        # worker waits for (a writing watcher would slow the claims and flushes it measures).
        # It reads at once when the service's wake-up for its job arrives (a claim, a flush).
        base = make_engine(url)
        engine = read_engine(base)
        server_pid = database_server_pid(url)
        if not heard.connected.wait(10):
            raise RuntimeError(f"the benchmark could not listen for {kind}'s wake-ups")
        try:
            first = poll_to_result(svc.client, params, timeout_s, engine, heard=heard)
            result.first_job_s, result.first_worker_s = first.seconds, first.worker_s
            claimed_ids: list[str] = []
            for r in range(rounds):
                result.floors.run(floor_data, job, seed=r)
                arrive()
                polled = poll_to_result(
                    svc.client, {**params, "seed": r}, timeout_s, engine, heard=heard
                )
                arrive()
                followed, _ = follow_to_result(
                    svc.client, {**params, "seed": r}, timeout_s, engine, heard=heard
                )
                arrive()
                # Live latency on a job of its own: the watcher reading its steps every 2 ms
                # slows the job it watches (~20% on PostgreSQL), which the others must not pay.
                live, seen = follow_to_result(
                    svc.client,
                    {**params, "seed": r},
                    timeout_s,
                    engine,
                    watch_steps=True,
                    heard=heard,
                )
                arrive()
                # Last before the next round's floor: its client checks back every 0.25 s, so
                # the worker has finished its after-work (a job's end, older states deleted)
                # before the floor runs; a followed job's final event comes before that.
                server_before = tree_cpu_seconds(server_pid) if server_pid else {}
                alone = poll_to_result(
                    svc.client, {**params, "seed": r}, timeout_s, every_s=CHECK_BACK_S
                )
                result.alone.add(alone.worker_s)
                # The thread counts it trained at, each round's in the progress line: what a
                # job took depends on them, and a run on a lent machine leaves nothing else.
                alone_id = str(alone.job["id"])
                alone_at = Counter(thread_counts_of(root, [alone_id])[alone_id])
                result.alone_steps_at.update(alone_at)
                if server_pid:
                    used = tree_cpu_used(server_before, tree_cpu_seconds(server_pid))
                    result.server_cpu_s.append(used)
                result.polled.add(polled.seconds)
                result.followed.add(followed.finished.seconds)
                for done in (polled, followed.finished):
                    claimed_ids.append(str(done.job["id"]))
                    if done.claim_s is not None:
                        result.claim_ms.append(done.claim_s * 1000)
                    if done.queued_claim_s is not None:
                        result.queued_claim_ms.append(done.queued_claim_s * 1000)
                    result.worker.add(done.worker_s)
                result.live_ms += [d * 1000 for d in live_delays(seen, live.arrivals)]
                print(
                    f"  results {kind} round {r + 1}/{rounds}: polled {polled.seconds:.2f} s, "
                    f"events {followed.finished.seconds:.2f} s, left alone (the worker's "
                    f"own) {alone.worker_s:.2f} s ({shares(alone_at) or 'threads fixed'}), "
                    f"floor {result.floors.last_s:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
            logged = logged_claims(root)
            missing = [i for i in claimed_ids if i not in logged]
            if missing:
                raise RuntimeError(f"the worker's log has no claim of jobs {missing}")
            result.logged_claim_ms = [logged[i] for i in claimed_ids]
            time.sleep(min(2.0, idle_s))  # let the last job's after-work settle
            result.idle = idle_shares(svc.pids, idle_s)
        finally:
            base.dispose()
    return result


def run_results(
    section: Section,
    root: Path,
    *,
    rounds: int,
    idle_s: float = 10.0,
    params: dict[str, Any] | None = None,
    data_root: Path | None = None,
) -> list[Backend]:
    """Measure on SQLite and PostgreSQL and write the section; returns the figures.

    ``params`` and ``data_root`` shrink the job and the data set (the tests' small run).
    """
    kinds, why_not = databases_here()
    with floor_data(data_root) as (data, mnist):
        backends = [
            measure_backend(
                kind, root / kind, mnist, params or {}, rounds=rounds, idle_s=idle_s, data_root=data
            )
            for kind in kinds
        ]
    write_section(section, backends, rounds=rounds, idle_s=idle_s, why_not=why_not)
    return backends


def write_section(
    section: Section, backends: list[Backend], *, rounds: int, idle_s: float, why_not: str | None
) -> None:
    """The tables and the goals."""
    section.para(
        "What a user waits for. The service runs as the README starts it, `mnist-service run "
        "--workers 1` (the API and one worker, each its own process, MNIST_ACCESS_LOG=false, "
        "otherwise the defaults), on a fresh SQLite file and on a fresh PostgreSQL database "
        "(created on 127.0.0.1:5432 and dropped). A client submits the tutorial's default job "
        "(`POST /jobs` with `{}`: 10,000 images × 3 epochs), each after a random pause of up to "
        f"one worker poll interval ({POLL_INTERVAL_S:g} s: users do not submit in step with "
        "the worker's polls), and either polls `GET /jobs/{id}` "
        "every 10 ms until it reads `succeeded`, or follows `GET /jobs/{id}/events` to the "
        "final `status` event, or leaves a third job alone (below; last in each round); a "
        "fourth job, followed, is there for the live latency only; "
        f"{rounds} rounds of the four, median. The floor is the bare eager "
        "loop for the same job (training + 3 evaluations, nothing stored; "
        f"{floor_threads_text()}, every count the worker may choose), run by the benchmark "
        "between the jobs, while the worker waits. A thread of "
        "the benchmark reads the job's status from the database from the POST's answer until "
        "the job has left the queue, every 2 ms and at once when the service's wake-up for the "
        "job reaches it (Core statements on one connection: it "
        "shares the cores with what it measures), and for the fourth job its last stored "
        "step too, all along (which slows that job: ~20% on PostgreSQL, 9% on SQLite, "
        "measured against claim-only reading in alternating jobs; so the figures of time to "
        "result come from the others). Claim latency (the goal's figure: how long a queued job "
        "waits for an idle worker) runs from the job's `created_at`, the API's clock just "
        "before its INSERT (so it holds the insert's commit), to the worker's clock once its "
        "claim has committed, as its log says it (`claimed job … attempt 1, N ms after it was "
        "created`; one host, one clock); the next row is what that thread sees: the job out of "
        "`queued`, which adds the claim's wake-up reaching the benchmark and a read (so it "
        "comes later, nearly always); the row after it counts from sending `POST /jobs` "
        "instead, adding the HTTP exchange and the API's handling (p50/p99 over the polled "
        f"and followed jobs, {2 * rounds}; `started_at − created_at` cannot say it: the "
        "worker takes its `now` before its claim's query). Live latency: each new last step "
        "the thread sees is a flush of the fourth job just committed, and the delay runs "
        "from that sighting to the first event on the stream that carries the step. The "
        "reader's sighting and this are off by one read after a wake-up, and by up to 2 ms "
        "and a read where none came. The "
        "worker's own time (its `started_at` → `finished_at`) is the goal's for a third job "
        f"of each round, left alone: its client checks back every {CHECK_BACK_S:g} s and no "
        "thread of the benchmark reads the database meanwhile, so what it holds is what the "
        "job itself pays (an easier test than a watched job's: the next row, whose jobs also "
        "had the client's 100 polls a second or its event stream; what a user's polling "
        "costs a job has a goal of its own, "
        "200 polls/s in the metrics section). Idle "
        f"cost: each process's user + system CPU (/proc/PID/stat) over {idle_s:g} s after "
        "the last job. Where the database has a server on this machine (PostgreSQL), the CPU of "
        "every process of the server (the postmaster in its data directory's `postmaster.pid` "
        "and its descendants: the backends, the WAL writer, the checkpointer, autovacuum) is "
        "summed over each job left alone, from its POST to its result (a lower bound: a process "
        "begun and ended within the job is missed); that CPU is taken from the cores the job "
        "trains on, and its share of them is what it would cost a job that kept them all busy "
        "(as the polls' in the metrics section)."
    )
    rows = []
    for b in backends:
        floor = b.floor_s

        def timed(
            figure: str, seconds: float, name: str = b.name, floor: float = floor
        ) -> list[str]:
            return [name, figure, fmt(seconds, "s"), fmt_ratio(ratio(seconds, floor))]

        rows += [
            [b.name, "floor (eager PyTorch, nothing stored)", fmt(floor, "s"), "1.00×"],
            timed("POST → `succeeded`, polling every 10 ms", b.polled.median),
            timed("POST → final `status` event", b.followed.median),
            timed("the worker's own started_at → finished_at, a job left alone", b.alone.median),
            *(
                [[b.name, "... its steps by the thread count they ran at", threads, ""]]
                if (threads := b.alone_threads())
                else []
            ),
            timed("the same, a job polled or followed (above)", b.worker.median),
            *([[b.name, SERVER_FIGURE, server, ""]] if (server := b.server_cpu()) else []),
            [
                b.name,
                "claim latency (created_at → the claim committed, the worker's log) p50 / p99",
                _p50_p99(b.logged_claim_ms),
                "",
            ],
            [
                b.name,
                "created_at → seen out of `queued` by the benchmark's reader, p50 / p99",
                _p50_p99(b.queued_claim_ms),
                "",
            ],
            [
                b.name,
                "POST sent → seen out of `queued`, p50 / p99",
                _p50_p99(b.claim_ms),
                "",
            ],
            [
                b.name,
                "live latency (flush committed → on the stream) p50 / p99",
                _live(b),
                "",
            ],
            [
                b.name,
                "a fresh worker's first job: POST → `succeeded` (its started → finished)",
                f"{fmt(b.first_job_s, 's')} ({fmt(b.first_worker_s, 's')})",
                fmt_ratio(ratio(b.first_job_s, floor)),
            ],
            [
                b.name,
                "idle CPU, share of one core: "
                + ", ".join(f"{name} {share:.2%}" for name, share in b.idle.items()),
                "",
                "",
            ],
        ]
    section.table(["database", "figure", "median", "÷ floor"], rows)
    if why_not is not None:
        section.para(f"PostgreSQL was not measured: the server did not answer ({why_not}).")
    section.para(
        "“200 polls/s slow a job by ≤ 10%” is measured in the metrics section (a worker "
        "process's jobs with and without the polls)."
    )
    goals = []
    for b in backends:
        floor = b.floor_s
        for label, series in (("polling", b.polled), ("events", b.followed)):
            x = ratio(series.median, floor)
            goals.append(
                [
                    f"{b.name}: time to result ({label}) ≤ {RESULT_GOAL}× floor",
                    f"{fmt_ratio(x)} ({fmt(series.median, 's')} vs {fmt(floor, 's')})",
                    verdict(x <= RESULT_GOAL),
                ]
            )
        claims = b.logged_claim_ms or [float("inf")]
        p50, p99 = percentile(claims, 50), percentile(claims, 99)
        goals.append(
            [
                f"{b.name}: claim latency (queued → claimed) p50 ≤ {CLAIM_P50_GOAL_MS:.0f} ms, "
                f"p99 ≤ {CLAIM_P99_GOAL_MS:.0f} ms",
                f"{_p50_p99(b.logged_claim_ms)} (seen by a reader: {_p50_p99(b.queued_claim_ms)})",
                verdict(p50 <= CLAIM_P50_GOAL_MS and p99 <= CLAIM_P99_GOAL_MS),
            ]
        )
        live99 = percentile(b.live_ms, 99) if b.live_ms else float("inf")
        goals.append(
            [
                f"{b.name}: a stored step reaches an open stream within {LIVE_GOAL_MS:.0f} ms",
                f"p50 / p99 {_live(b)}",
                verdict(live99 <= LIVE_GOAL_MS),
            ]
        )
        w, server = ratio(b.alone.median, floor), b.server_cpu()
        goals.append(
            [
                f"{b.name}: the worker's own time ≤ {WORKER_GOAL}× floor (a job left alone)",
                f"{fmt_ratio(w)} ({fmt(b.alone.median, 's')}; "
                f"polled or followed: {fmt_ratio(ratio(b.worker.median, floor))}"
                + (f"; the database server's CPU: {server}" if server else "")
                + ")",
                verdict(w <= WORKER_GOAL),
            ]
        )
        worst = max(b.idle.get("API", 0.0), b.idle.get("worker", 0.0))
        goals.append(
            [
                f"{b.name}: an idle worker or API costs ≤ {IDLE_GOAL:.0%} of a core",
                f"worker {b.idle.get('worker', 0.0):.2%}, API {b.idle.get('API', 0.0):.2%}",
                verdict(worst <= IDLE_GOAL),
            ]
        )
    section.goal_table(goals)


def _p50_p99(values_ms: list[float]) -> str:
    if not values_ms:
        return "none measured"
    return f"{fmt(percentile(values_ms, 50), 'ms')} / {fmt(percentile(values_ms, 99), 'ms')}"


def _live(b: Backend) -> str:
    if not b.live_ms:
        return "no flush seen"
    return (
        f"{fmt(median(b.live_ms), 'ms')} / {fmt(percentile(b.live_ms, 99), 'ms')} "
        f"({len(b.live_ms)} flushes)"
    )
