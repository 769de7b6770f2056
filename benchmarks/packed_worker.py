"""MNIST_PACK_MAX through the real worker: K queued jobs, packed against one at a time.

:mod:`benchmarks.packing` times the training loops alone; this times what a client waits for.
K tutorial-size jobs (seeds and learning rates of a small sweep) are queued in a migrated SQLite
file, then one in-process :class:`workers.worker.Worker` serves them, with ``MNIST_PACK_MAX=K``
(claimed together, trained as one pack) and with ``MNIST_PACK_MAX=1`` (one after another), from
the first claim to the last job's ``succeeded``: claims, every step's loss written, checkpoints
and endings included. Both with the default MNIST_TORCH_THREADS=auto (a pack's steps are
timed by the same tuner as a job's). Each
figure is the median of ``rounds`` runs, packed and one-by-one alternating, so the shared
host's swings hit both alike. The pack size with the most trials per second is the default's
measure (``MNIST_PACK_MAX``, service/settings.py).

Run: ``python -m benchmarks.packed_worker [--sizes 1,2,4,8,16] [--rounds R]``; ``make bench``
writes its table to docs/benchmarks.md ("Packed training").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.env import Workspace, load_average, make_workspace
from benchmarks.jobs import recorded, submit
from benchmarks.packing import Rates
from benchmarks.report import Section
from benchmarks.stats import median
from service.status import JobStatus
from service.store.engines import make_engine, make_sessionmaker
from workers.worker import Worker

SIZES = (1, 2, 4, 8, 16)


def serve(ws: Workspace, k: int, pack_max: int) -> float:
    """Queue ``k`` tutorial-size jobs and serve them with one worker; the seconds it took."""
    settings = ws.settings(pack_max=pack_max, poll_interval_s=0.05)
    engine = make_engine(settings.database_url)
    try:
        sessions = make_sessionmaker(engine)
        ids = [submit(sessions, seed=i, learning_rate=1e-3 * (1 + i % 4)) for i in range(k)]
        worker = Worker(settings, sessions, show_progress=False)
        with contextlib.redirect_stderr(io.StringIO()):
            began = time.perf_counter()
            worker.run(max_jobs=k)
            seconds = time.perf_counter() - began
        for job_id in ids:
            job, steps, _ = recorded(sessions, job_id)
            if job.status != JobStatus.SUCCEEDED or steps != job.total_steps:
                raise RuntimeError(f"job {job_id} ended {job.status} with {steps} steps")
        return seconds
    finally:
        engine.dispose()


def measure(root: Path, sizes: Sequence[int] = SIZES, rounds: int = 3) -> list[Rates]:
    """For each K: K jobs packed and one by one, alternating, ``rounds`` times each."""
    ws = make_workspace(root)
    serve(ws, 1, 1)  # the data set read and the code warmed before anything is timed
    rows = []
    for k in sizes:
        packed, solo = [], []
        for _ in range(rounds):
            packed.append(serve(ws, k, k))
            solo.append(serve(ws, k, 1))
        rows.append(Rates(k, median(packed), median(solo)))
    return rows


def best(rows: Sequence[Rates]) -> Rates:
    """The pack size that served the most trials per second."""
    return max(rows, key=lambda r: r.packed_rate)


def cells(rows: Sequence[Rates]) -> tuple[list[str], list[list[str]]]:
    """The rows as table headers and cells."""
    headers = ["K", "packed s", "trials/s packed", "one by one s", "trials/s one by one"]
    return [*headers, "speed-up"], [
        [
            str(r.k),
            f"{r.packed_s:.2f}",
            f"{r.packed_rate:.2f}",
            f"{r.solo_s:.2f}",
            f"{r.solo_rate:.2f}",
            f"{r.solo_s / r.packed_s:.2f}×",
        ]
        for r in rows
    ]


def run_packing(section: Section, root: Path, *, rounds: int) -> None:
    """``make bench``'s "Packed training" section."""
    before = load_average()
    rows = measure(root, rounds=rounds)
    top = best(rows)
    section.para(
        "K tutorial-size jobs (10,000 images × 3 epochs, batch 64; seeds and learning rates of "
        "a sweep) queued, then served by one worker from the first claim to the last "
        "`succeeded` (every step's loss stored, checkpoints written), with MNIST_PACK_MAX=K "
        "(one claim, one pack: workers/packed.py) and with MNIST_PACK_MAX=1 (one by one), "
        "both with MNIST_TORCH_THREADS=auto (the tuner times a pack's steps as it times a "
        f"job's); median of {rounds} runs each, alternating "
        f"(`python -m benchmarks.packed_worker`; load average {before} → {load_average()})."
    )
    section.table(*cells(rows))
    section.para(
        f"Most trials per second in this run at K = {top.k} ({top.packed_rate:.2f}/s, "
        f"{top.solo_s / top.packed_s:.2f}× one by one). MNIST_PACK_MAX's default (8) comes "
        "from several tables like this one: the best K moves between runs on this shared "
        "host, K = 8 was never far from it, packs an 8-trial sweep whole, and a larger pack "
        "finishes each of its jobs later. `python -m benchmarks.packing` times the loops "
        "alone and splits a packed step's time."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="pack sizes")
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args(argv)
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="mnist-packed-") as tmp:
        rows = measure(Path(tmp), [int(k) for k in args.sizes.split(",")], rounds=args.rounds)
    print(f"K jobs through one worker, 1 thread; load average {before} → {load_average()}")
    headers, body = cells(rows)
    print("| " + " | ".join(headers) + " |")
    for row in body:
        print("| " + " | ".join(row) + " |")
    print(f"most trials per second at K = {best(rows).k}")


if __name__ == "__main__":
    main()
