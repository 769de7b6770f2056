"""``python -m benchmarks.gpu``: the training figures on a CUDA card, in one short run.

Baseline (the tutorial's loop, batches copied to the card, ``loss.item()`` per step), floor
(the bare loop on cached tensors) and the service's worker on the same card in the same
process, the worker both with its default CUDA graph of the step and with eager steps
(MNIST_CUDA_GRAPHS=false); then the same on 60,000 images, and a count of the host
synchronisations a job makes (``torch.cuda.set_sync_debug_mode``). Writes
docs/benchmarks-gpu.md with the card's name. Goals: the worker ≥ 30× the baseline, 60,000
images × 3 epochs in under 1 s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.env import REPO_ROOT, data_dir, load_average, machine_lines, make_workspace
from benchmarks.floor import floor_train
from benchmarks.jobs import run_one_job, submit
from benchmarks.report import Report
from benchmarks.stats import Series, fmt, fmt_ratio, ratio, verdict
from benchmarks.tutorial import tutorial_data, tutorial_train
from service import repository
from service.clock import utcnow
from service.db import make_engine, make_sessionmaker
from service.schemas import JobCreate
from workers.data import load_mnist
from workers.graphs import graph_backend
from workers.progress import Claim, Limits, Reporter
from workers.train import train

SPEEDUP_GOAL = 30.0
BIG_GOAL_S = 1.0
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks-gpu.md"


def count_syncs(sessions: sessionmaker[Session], device: torch.device) -> tuple[int, int, int]:
    """(steps, flushes + epochs, synchronising calls) for one 10,000-image job on ``device``."""
    params = JobCreate(seed=0)
    job_id = submit(sessions, seed=0)
    with sessions.begin() as session:
        claimed = repository.claim_job(
            session, worker_id="gpu-bench", lease_s=600, device=str(device), now=utcnow()
        )
        if claimed is None or claimed.id != job_id:
            raise RuntimeError(f"expected to claim job {job_id}")
    reporter = Reporter(
        claim=Claim(job_id, 1, "gpu-bench"),
        params=params,
        sessions=sessions,
        limits=Limits(lease_s=600, flush_interval_s=0.25),
        stop=threading.Event(),
        checkpoint_dir=Path(tempfile.mkdtemp(prefix="mnist-gpu-bench-")),
        show_progress=False,
    )
    flushes = 0
    flush = reporter.flush

    def counted_flush() -> None:
        nonlocal flushes
        flushes += 1
        flush()

    reporter.flush = counted_flush  # type: ignore[method-assign]
    data = load_mnist(data_dir(), device=device, download=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(params, data, device, 0, reporter, graphs=graph_backend(device, True))
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    steps = reporter.steps_per_epoch * params.epochs
    return steps, flushes + params.epochs, syncs


def main(argv: list[str] | None = None) -> int:
    """Measure on the first CUDA device and write the report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    # A step that cannot be captured trains eagerly with a warning: the report says so.
    fallbacks: list[str] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = lambda record: fallbacks.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("workers").addHandler(catcher)
    report = Report("GPU benchmarks")
    report.preamble += [
        f"Written by `python -m benchmarks.gpu` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        "medians of the runs, every ratio within this run on this card.",
        "",
        *machine_lines(),
        f"- Load average: {load_average()}",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="mnist-gpu-bench-") as tmp:
        ws = make_workspace(Path(tmp))
        engine = make_engine(ws.database_url)
        sessions = make_sessionmaker(engine)
        settings = ws.settings(device="cuda")
        eager = ws.settings(device="cuda", cuda_graphs=False)
        tutorial = tutorial_data(data_dir())
        data = load_mnist(data_dir(), device=device, download=False)
        run_one_job(settings, sessions, seed=0)  # warm: CUDA context, kernels, cached data
        run_one_job(eager, sessions, seed=0)
        baseline, floor, job = Series("baseline", "s"), Series("floor", "s"), Series("job", "s")
        job_eager = Series("job, eager steps", "s")
        big_floor, big_job = Series("floor 60k", "s"), Series("job 60k", "s")
        big_eager = Series("job 60k, eager steps", "s")
        accs: dict[str, float | None] = {}
        params, big = JobCreate(), JobCreate(trainset_size=60_000)
        for r in range(args.runs):
            t = tutorial_train(tutorial, params, seed=r, device=device)
            baseline.add(t.seconds)
            accs["baseline"] = t.accuracy
            f = floor_train(data, params, seed=r, device=device)
            torch.cuda.synchronize()
            floor.add(f.seconds)
            accs["floor"] = f.accuracy
            j = run_one_job(settings, sessions, seed=r)
            job.add(j.seconds)
            accs["job"] = j.accuracy
            e = run_one_job(eager, sessions, seed=r)
            job_eager.add(e.seconds)
            accs["eager"] = e.accuracy
            big_floor.add(floor_train(data, big, seed=r, device=device).seconds)
            big_job.add(run_one_job(settings, sessions, seed=r, trainset_size=60_000).seconds)
            big_eager.add(run_one_job(eager, sessions, seed=r, trainset_size=60_000).seconds)
        steps, expected, syncs = count_syncs(sessions, device)
        engine.dispose()
    s = report.section(f"Training on {torch.cuda.get_device_name(0)}")
    s.table(
        ["figure", "median", "÷ floor", "speed-up over baseline", "accuracy (last run)"],
        [
            [
                name,
                fmt(series.median, "s"),
                fmt_ratio(ratio(series.median, floor.median)),
                fmt_ratio(ratio(baseline.median, series.median)),
                f"{accs[key]:.4f}" if accs.get(key) is not None else "–",
            ]
            for name, key, series in (
                ("baseline: the tutorial's loop, 10,000 images", "baseline", baseline),
                ("floor: bare loop, 10,000 images", "floor", floor),
                ("the service's worker job, 10,000 images", "job", job),
                ("worker job, eager steps (MNIST_CUDA_GRAPHS=false)", "eager", job_eager),
            )
        ],
    )
    s.para(
        f"60,000 images × 3 epochs: worker job {fmt(big_job.median, 's')}, with eager steps "
        f"{fmt(big_eager.median, 's')}, floor {fmt(big_floor.median, 's')}. The CUDA graph of "
        f"the step makes a job {fmt_ratio(ratio(job_eager.median, job.median))} faster on "
        f"10,000 images and {fmt_ratio(ratio(big_eager.median, big_job.median))} on 60,000."
    )
    if fallbacks:
        s.para("The step could not be captured, so these jobs trained eagerly: " + fallbacks[0])
    speedup = ratio(baseline.median, job.median)
    s.goal_table(
        [
            [
                f"job ≥ {SPEEDUP_GOAL:.0f}× baseline",
                fmt_ratio(speedup),
                verdict(speedup >= SPEEDUP_GOAL),
            ],
            [
                f"60,000 images × 3 epochs < {BIG_GOAL_S:.0f} s",
                f"job {fmt(big_job.median, 's')} (floor {fmt(big_floor.median, 's')})",
                verdict(big_job.median < BIG_GOAL_S),
            ],
            [
                "no per-step host synchronisation",
                f"{syncs} synchronising calls in {steps} steps ({expected} flushes + epochs)",
                verdict(syncs <= 2 * expected),
            ],
        ],
    )
    report.write(args.output)
    print(report.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
