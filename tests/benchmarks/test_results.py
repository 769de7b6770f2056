"""The time-to-result benchmark, end to end on a small job: real service processes, both
databases where PostgreSQL answers, every figure filled in and the goals written."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from statistics import median

from benchmarks.report import Report
from benchmarks.result_clients import live_delays
from benchmarks.result_service import (
    POSTGRES_ADMIN_DEFAULT,
    POSTGRES_ADMIN_ENV,
    database_server_pid,
    logged_claims,
    logged_thread_counts,
    postgres_reachable,
)
from benchmarks.results import run_results, shares
from tests.support import SMALL_TEST, SMALL_TRAIN

POSTGRES_URL = os.environ.get(POSTGRES_ADMIN_ENV, POSTGRES_ADMIN_DEFAULT)
SMALL_JOB = {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 2}


def test_the_section_measures_a_real_service_on_each_database(
    small_mnist: Path, tmp_path: Path
) -> None:
    report = Report("Benchmarks")
    section = report.section("Time to result")
    backends = run_results(
        section, tmp_path, rounds=1, idle_s=0.5, params=SMALL_JOB, data_root=small_mnist
    )

    expected = ["sqlite"] + (["postgresql"] if postgres_reachable() is None else [])
    assert [b.name for b in backends] == expected
    for b in backends:
        assert len(b.polled.values) == len(b.followed.values) == 1
        # The client's wait holds the worker's time, which holds at least the training.
        assert b.polled.median > b.worker.values[0] > 0
        assert b.followed.median > b.worker.values[1] > 0
        assert len(b.alone.values) == 1 and b.alone.values[0] > 0  # the job left alone
        # Its 20 steps by the thread count they ran at, as the worker's log said (auto).
        assert sum(b.alone_steps_at.values()) == 20 and set(b.alone_steps_at) <= {1, 2}
        assert len(b.claim_ms) == 2 and all(ms >= 0 for ms in b.claim_ms)
        # created_at comes after the POST was sent: a queued job waits less than the client.
        assert len(b.queued_claim_ms) == 2 and all(ms >= 0 for ms in b.queued_claim_ms)
        assert all(q <= c + 1 for q, c in zip(b.queued_claim_ms, b.claim_ms, strict=True))
        # The worker's log says when each claim committed: before a reader could see it.
        assert len(b.logged_claim_ms) == 2 and all(ms >= 0 for ms in b.logged_claim_ms)
        assert median(b.logged_claim_ms) <= median(b.queued_claim_ms) + 5
        assert b.live_ms and all(ms >= 0 for ms in b.live_ms)  # the watcher saw the flushes
        assert b.first_job_s > b.first_worker_s > 0
        assert set(b.idle) == {"supervisor", "API", "worker"}
        assert all(0 <= share < 1 for share in b.idle.values())
        assert b.floor_s > 0
        # The server's CPU is counted where there is one on this machine whose files are ours
        # to read (PostgreSQL here and in CI, as root); SQLite has none.
        counted = b.name == "postgresql" and database_server_pid(POSTGRES_URL) is not None
        assert len(b.server_cpu_s) == (1 if counted else 0)
        assert all(cpu_s > 0 for cpu_s in b.server_cpu_s)
    text = report.render()
    servers = sum(1 for b in backends if b.server_cpu_s)
    assert text.count("the database server's CPU over a job left alone") == servers
    assert text.count("; the database server's CPU: ") == 2 * servers  # section and summary
    assert text.count("time to result (polling) ≤ 1.5× floor") == 2 * len(backends)
    assert "claim latency" in text and "idle CPU" in text
    assert text.count("... its steps by the thread count they ran at") == len(backends)
    # Once in the section, once in the summary.
    assert text.count("the worker's own time ≤ 1.2× floor (a job left alone)") == 2 * len(backends)


def test_a_flush_is_late_by_the_time_its_step_took_to_reach_the_stream() -> None:
    seen = [(10, 1.0), (20, 2.0), (30, 3.0)]  # (last stored step, when first seen)
    arrivals = [(10, 1.05), (25, 2.5), (30, 2.999)]  # (last step of an event, when it came)
    delays = live_delays(seen, arrivals)
    assert [round(d, 3) for d in delays] == [0.05, 0.5, 0.0]  # never below zero
    assert live_delays([(40, 4.0)], arrivals) == []  # never on the stream: no figure


def test_the_workers_logged_claims_are_read_by_job(tmp_path: Path) -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    (tmp_path / "service.log").write_text(
        f"INFO workers: claimed job {a} attempt 1, 4.2 ms after it was created [worker_id=w]\n"
        f"INFO workers: claimed job {b} attempt 1 (a pack of 2), 12.5 ms after it was created\n"
        f"INFO workers: claimed job {c} attempt 2\n"  # a retry: no figure
    )
    assert logged_claims(tmp_path) == {a: 4.2, b: 12.5}


def test_the_workers_logged_thread_counts_are_read_by_job(tmp_path: Path) -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    (tmp_path / "service.log").write_text(
        f"INFO workers: job {a} succeeded; steps by thread count: 1: 31, 2: 440 [worker_id=w]\n"
        f"INFO workers: job {b} succeeded; steps by thread count: 4: 471\n"
        f"INFO workers: job {c} succeeded\n"  # threads fixed: no tuner, no figure
    )
    assert logged_thread_counts(tmp_path) == {a: {1: 31, 2: 440}, b: {4: 471}, c: {}}


def test_the_thread_counts_shares_come_most_first() -> None:
    assert shares(Counter({1: 31, 2: 440})) == "2 threads 93%, 1 thread 7%"
    assert shares(Counter()) == ""  # the count was fixed: the worker's log says none
