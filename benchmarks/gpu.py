"""``python -m benchmarks.gpu``: the training figures on a CUDA card, in one short run.

Baseline (the tutorial's loop, batches copied to the card, ``loss.item()`` per step), floor
(the bare loop on cached tensors) and the service's worker on the same card in the same
process, the worker both with its default CUDA graph of the step and with eager steps
(MNIST_CUDA_GRAPHS=false); then the same on 60,000 images, and a count of the host
synchronisations a job makes (``torch.cuda.set_sync_debug_mode``); then sweeps: 1, 64 and
256 trials packed into one model step against the same trials one at a time. Writes
docs/benchmarks-gpu.md with the card's name. Goals: the worker ≥ 30× the baseline, 60,000
images × 3 epochs in under 1 s, 64 packed trials ≥ 20× one at a time.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.env import REPO_ROOT, data_dir, load_average, machine_lines, make_workspace
from benchmarks.floor import floor_train
from benchmarks.jobs import run_one_job, submit
from benchmarks.packing import PackRow
from benchmarks.packing import measure as measure_packing
from benchmarks.packing import table as packing_table
from benchmarks.report import Report
from benchmarks.stats import Series, fmt, fmt_ratio, ratio, verdict
from benchmarks.syncs import Syncs, synchronisations
from benchmarks.tutorial import tutorial_data, tutorial_train
from service.clock import utcnow
from service.schemas import JobCreate
from service.store import queue_repo
from service.store.engines import make_engine, make_sessionmaker
from workers.data import Mnist, load_mnist
from workers.reporting import Claim, Limits, Reporter
from workers.training.graphs import graph_backend
from workers.training.train import train

SPEEDUP_GOAL = 30.0
PACK_GOAL_K, PACK_SPEEDUP_GOAL = 64, 20.0
BIG_GOAL_S = 1.0
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks-gpu.md"
SIZES = {"trainset_size", "testset_size"}  # what a figure's jobs are given of its parameters


def count_syncs(
    sessions: sessionmaker[Session],
    data: Mnist,
    device: torch.device,
    params: JobCreate,
    checkpoints: Path,
) -> Syncs:
    """The synchronising calls one job on ``data`` (already on ``device``) makes there
    (``torch.cuda.set_sync_debug_mode``)."""
    params = params.model_copy(update={"seed": 0})
    job_id = submit(sessions, **params.model_dump())
    with sessions.begin() as session:
        claimed = queue_repo.claim_job(
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
        checkpoint_dir=checkpoints,
        show_progress=False,
    )
    flushes = 0
    flush = reporter.flush

    def counted_flush() -> None:
        nonlocal flushes
        flushes += 1
        flush()

    reporter.flush = counted_flush  # type: ignore[method-assign]
    with synchronisations(device) as sites:
        train(params, data, device, 0, reporter, graphs=graph_backend(device, True))
    synchronize(device)
    steps = reporter.steps_per_epoch * params.epochs
    counted = sites if device.type == "cuda" else None
    return Syncs(steps, params.epochs, flushes + params.epochs, counted)


def synchronize(device: torch.device) -> None:
    """Wait for the card's queued work, so that a timer stops after it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The card's name, as the report's headings give it."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def main(argv: list[str] | None = None) -> int:
    """Measure on the first CUDA card (or ``--device``) and write the report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--device", default="cuda", help="the card to measure (cpu only checks this script)"
    )
    parser.add_argument("--trainset-size", type=int, default=10_000)
    parser.add_argument("--testset-size", type=int, default=1_000)
    parser.add_argument("--big-trainset-size", type=int, default=60_000)
    parser.add_argument(
        "--pack-sizes", default="1,64,256", help="packed sweeps to time (trials per pack)"
    )
    parser.add_argument(
        "--solo-max", type=int, default=64, help="at most this many trials timed one by one"
    )
    args = parser.parse_args(argv)
    command = shlex.join(
        ["python", "-m", "benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)]
    )
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure", file=sys.stderr)
        return 2
    # A step that cannot be captured trains eagerly with a warning: the report says so.
    fallbacks: list[str] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = lambda record: fallbacks.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("workers").addHandler(catcher)
    try:
        return measure(args, device, command, fallbacks)
    finally:
        logging.getLogger("workers").removeHandler(catcher)


def measure(
    args: argparse.Namespace, device: torch.device, command: str, fallbacks: list[str]
) -> int:
    """Run every figure on ``device`` and write the report; ``fallbacks`` holds the warnings
    of steps that could not be captured."""
    report = Report("GPU benchmarks")
    report.preamble += [
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
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
        settings = ws.settings(device=device.type)
        eager = ws.settings(device=device.type, cuda_graphs=False)
        tutorial = tutorial_data(data_dir())
        data = load_mnist(data_dir(), device=device, download=False)
        params = JobCreate(trainset_size=args.trainset_size, testset_size=args.testset_size)
        big = params.model_copy(update={"trainset_size": args.big_trainset_size})
        sizes = params.model_dump(include=SIZES)
        big_sizes = big.model_dump(include=SIZES)
        run_one_job(settings, sessions, seed=0, **sizes)  # warm: context, kernels, cached data
        run_one_job(eager, sessions, seed=0, **sizes)
        baseline, floor, job = Series("baseline", "s"), Series("floor", "s"), Series("job", "s")
        job_eager = Series("job, eager steps", "s")
        flush = Series("job's flushes", "s")
        big_floor, big_job = Series("floor 60k", "s"), Series("job 60k", "s")
        big_eager = Series("job 60k, eager steps", "s")
        accs: dict[str, float | None] = {}
        for r in range(args.runs):
            t = tutorial_train(tutorial, params, seed=r, device=device)
            baseline.add(t.seconds)
            accs["baseline"] = t.accuracy
            f = floor_train(data, params, seed=r, device=device)
            synchronize(device)
            floor.add(f.seconds)
            accs["floor"] = f.accuracy
            j = run_one_job(settings, sessions, seed=r, **sizes)
            job.add(j.seconds)
            flush.add(j.flush_seconds)
            accs["job"] = j.accuracy
            e = run_one_job(eager, sessions, seed=r, **sizes)
            job_eager.add(e.seconds)
            accs["eager"] = e.accuracy
            big_floor.add(floor_train(data, big, seed=r, device=device).seconds)
            big_job.add(run_one_job(settings, sessions, seed=r, **big_sizes).seconds)
            big_eager.add(run_one_job(eager, sessions, seed=r, **big_sizes).seconds)
        syncs = count_syncs(sessions, data, device, params, ws.checkpoint_dir)
        engine.dispose()
        sizes_k = [int(k) for k in args.pack_sizes.split(",")]
        packs = measure_packing(data, sizes_k, params, device=device, solo_max=args.solo_max)
    n = params.trainset_size
    s = report.section(f"Training on {device_name(device)}")
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
                (f"baseline: the tutorial's loop, {n:,} images", "baseline", baseline),
                (f"floor: bare loop, {n:,} images", "floor", floor),
                (f"the service's worker job, {n:,} images", "job", job),
                ("worker job, eager steps (MNIST_CUDA_GRAPHS=false)", "eager", job_eager),
            )
        ],
    )
    s.para(
        f"{big.trainset_size:,} images × {big.epochs} epochs: worker job "
        f"{fmt(big_job.median, 's')}, with eager steps {fmt(big_eager.median, 's')}, "
        f"floor {fmt(big_floor.median, 's')}. The CUDA graph of the step makes a job "
        f"{fmt_ratio(ratio(job_eager.median, job.median))} faster on {n:,} images and "
        f"{fmt_ratio(ratio(big_eager.median, big_job.median))} on {big.trainset_size:,}."
    )
    # What limits a job: a step's launches (graphed against eager, against the bare loop), or
    # the database (the flushes' share of the job).
    s.para(
        f"Job time ÷ training steps: {fmt(job.median / syncs.steps * 1e6, 'µs')} in a graphed "
        "job, "
        f"{fmt(job_eager.median / syncs.steps * 1e6, 'µs')} with eager steps, "
        f"{fmt(floor.median / syncs.steps * 1e6, 'µs')} in the floor's bare loop "
        f"({syncs.steps} steps). The job's metric flushes took {fmt(flush.median, 's')} of its "
        f"{fmt(job.median, 's')}."
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
                f"{big.trainset_size:,} images × {big.epochs} epochs < {BIG_GOAL_S:.0f} s",
                f"job {fmt(big_job.median, 's')} (floor {fmt(big_floor.median, 's')})",
                verdict(big_job.median < BIG_GOAL_S),
            ],
            [
                "no per-step host synchronisation",
                syncs.describe(),
                verdict(not syncs.per_step),
            ],
        ],
    )
    packed_section(report, packs, device)
    report.write(args.output)
    print(report.render())
    return 0


def packed_section(report: Report, rows: list[PackRow], device: torch.device) -> None:
    """Sweeps on the card: K trials packed into one model step against the same K trials
    trained one at a time by the worker's loop (issue #17's goal: 64 trials ≥ 20×)."""
    s = report.section(f"Packed trials on {device_name(device)}")
    s.para(
        "K trials of the tutorial's job (learning rates and seeds differ) trained as one pack "
        "(`workers/training/packing.py`) against the same trials one at a time by the "
        "worker's loop (`workers/training/train.py`), in this process, nothing stored. "
        "'(paced)': only the first trials ran one by one and the rest are counted at their "
        "pace. The step's split is the host's time in each part (on a card, launching its "
        "kernels)."
    )
    s.lines += [packing_table(rows), ""]
    goal = next((r for r in rows if r.k == PACK_GOAL_K), max(rows, key=lambda r: r.k))
    speedup = ratio(goal.solo_s, goal.packed_s)
    s.goal_table(
        [
            [
                f"{goal.k} trials packed ≥ {PACK_SPEEDUP_GOAL:.0f}× one at a time",
                fmt_ratio(speedup),
                verdict(speedup >= PACK_SPEEDUP_GOAL),
            ]
        ]
    )


def card_summary(path: Path = DEFAULT_OUTPUT) -> list[str] | None:
    """From a document this module wrote on a card: its "Written by" line, its GPU line and
    its summary table, for the CPU document to quote; None if there is none."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    written = next((line for line in lines if line.startswith("Written by")), None)
    card = next((line for line in lines if line.startswith("- GPU:")), None)
    if written is None or card is None or "## Summary" not in lines:
        return None
    start = lines.index("## Summary") + 2
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [written, card, *lines[start:end]]


if __name__ == "__main__":
    sys.exit(main())
