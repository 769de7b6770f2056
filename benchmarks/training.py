"""Training: the tutorial's loop (baseline), the bare loop (floor) and the service's worker.

Every figure is the median of several runs made in one process, round by round, so that the
machine's swings hit all of them alike. The worker runs on a migrated SQLite file, with the
data already cached in the process (warm), except for the fresh-process figure (cold).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.env import REPO_ROOT, Workspace, data_dir, make_workspace
from benchmarks.floor import (
    cpu_mnist,
    floor_label,
    floor_threads,
    floor_threads_text,
    floor_train,
)
from benchmarks.jobs import JobRun, run_one_job, submit
from benchmarks.profiling import in_process, share_rows
from benchmarks.report import Section
from benchmarks.stats import Series, fmt, fmt_ratio, median, ratio, verdict
from benchmarks.tutorial import Trained, TutorialData, tutorial_data, tutorial_train
from service.schemas import JobCreate
from service.settings import Settings
from service.store.engines import make_engine, make_sessionmaker
from workers.data import Mnist
from workers.tuning.threads import process_tuner

JOB_LABEL = "**the service's worker job** (warm)"
UNPERSISTED_LABEL = "worker job, metric writes stubbed out"

DEFAULT_THREADS = torch.get_num_threads()  # what torch picks in a fresh process
JOB_GOAL = 1.2  # a job's time / the floor's
METRIC_WRITES_GOAL = 0.05  # share of a job's wall time
EPOCHS = 3


@dataclass
class Case:
    """A training figure: its times, and the final accuracy of each run."""

    label: str
    images: int
    times: Series
    accuracies: list[float] = field(default_factory=list)

    def record(self, seconds: float, accuracy: float | None) -> None:
        """One run's wall time and final accuracy."""
        self.times.add(seconds)
        if accuracy is not None:
            self.accuracies.append(accuracy)

    @property
    def accuracy(self) -> float | None:
        """The median final accuracy."""
        return median(self.accuracies) if self.accuracies else None


def new_case(label: str, images: int) -> Case:
    """An empty case."""
    return Case(label, images, Series(label, "s"))


@dataclass
class TrainingResult:
    """What the summary needs from this benchmark."""

    floor_s: float
    job_s: float
    job_vs_floor: float
    metric_writes_share: float
    accuracy_gap: float
    baseline_s: float  # the tutorial's loop, 10,000 images: how fast this host ran today


def _with_threads(threads: int, fn: Callable[[], Trained]) -> Trained:
    torch.set_num_threads(threads)
    return fn()


def _check_recorded(run: JobRun, epochs: int) -> None:
    if run.status != "succeeded":
        raise RuntimeError(f"benchmark job {run.job_id} ended {run.status}")
    if run.steps_recorded != run.total_steps or run.epochs_recorded != epochs:
        raise RuntimeError(
            f"job {run.job_id} recorded {run.steps_recorded}/{run.total_steps} steps and "
            f"{run.epochs_recorded}/{epochs} epochs"
        )


class TrainingBench:
    """The training figures, measured on one workspace in this process."""

    def __init__(self, root: Path) -> None:
        self.ws: Workspace = make_workspace(root)
        self.engine = make_engine(self.ws.database_url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self.settings: Settings = self.ws.settings()  # the service's defaults
        self.tutorial: TutorialData = tutorial_data(data_dir())
        self.data: Mnist = cpu_mnist()

    @property
    def threads(self) -> int:
        """The baseline's intra-op threads: the worker's fixed count, or 1 where the worker
        chooses its own (``auto``, the default)."""
        fixed = self.settings.torch_threads
        if isinstance(fixed, int):
            return fixed
        return 1 if fixed == "auto" else DEFAULT_THREADS

    def close(self) -> None:
        """Release the database."""
        self.engine.dispose()

    def job(self, *, images: int, seed: int, persist: bool = True) -> JobRun:
        """One worker job with the service's settings (thread setting included: a fixed
        count, or the process's tuner that the worker applies as each job starts)."""
        if isinstance(self.settings.torch_threads, int):
            torch.set_num_threads(self.settings.torch_threads)
        run = run_one_job(
            self.settings,
            self.sessions,
            persist=persist,
            seed=seed,
            trainset_size=images,
            epochs=EPOCHS,
        )
        if persist:
            _check_recorded(run, EPOCHS)
        return run

    def cold_job(self, *, images: int, seed: int) -> tuple[float, float]:
        """A fresh worker process's first job: (claim → succeeded, process spawn → exit)."""
        job_id = submit(self.sessions, seed=seed, trainset_size=images, epochs=EPOCHS)
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.cold_job", job_id],
            cwd=REPO_ROOT,
            env=self.ws.env(),
            check=True,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["status"] != "succeeded":
            raise RuntimeError(f"cold job {job_id} ended {result['status']}")
        return float(result["seconds"]), wall

    def measure(
        self,
        images: int,
        runs: int,
        baseline_runs: int,
        cold_runs: int,
        floor_counts: tuple[int, ...] | None = None,
    ) -> list[Case]:
        """Round-robin runs of every figure for ``images`` training images."""
        floor_counts = floor_counts or floor_threads()
        threads = self.threads
        baseline = new_case(f"baseline: the tutorial's loop ({threads} thread(s))", images)
        floors = {t: new_case(floor_label(t), images) for t in floor_counts}
        job = new_case(JOB_LABEL, images)
        unpersisted = new_case(UNPERSISTED_LABEL, images)
        cold = new_case("fresh worker's first job (cold data)", images)
        cold_process = new_case("fresh worker process, spawn → exit", images)
        flush = Series("flush", "s")
        params = JobCreate(trainset_size=images, epochs=EPOCHS)
        for r in range(runs):
            if r < baseline_runs:
                t = _with_threads(
                    threads,
                    functools.partial(tutorial_train, self.tutorial, params, seed=r),
                )
                baseline.record(t.seconds, t.accuracy)
            for count, case in floors.items():  # (the baseline's count stays ``threads``)
                t = _with_threads(count, functools.partial(floor_train, self.data, params, seed=r))
                case.record(t.seconds, t.accuracy)
            run = self.job(images=images, seed=r)
            job.record(run.seconds, run.accuracy)
            flush.add(run.flush_seconds)
            bare = self.job(images=images, seed=r, persist=False)
            unpersisted.record(bare.seconds, bare.accuracy)
            print(
                f"  {images} images, round {r + 1}/{runs}: job {run.seconds:.2f} s, floor "
                f"{floors[floor_counts[0]].times.values[-1]:.2f} s, baseline "
                f"{baseline.times.values[-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            if r < cold_runs:
                seconds, wall = self.cold_job(images=images, seed=r)
                cold.record(seconds, None)
                cold_process.record(wall, None)
        self.flush = flush
        cases = [baseline, *floors.values(), job, unpersisted]
        if cold_runs:
            cases += [cold, cold_process]
        return cases


# Where a warm job's time goes; the first label found on a sampled stack wins.
JOB_PARTS = {
    "metric writes (Reporter.flush)": "flush (",
    "claim": "claim (",
    "checkpoint (save_checkpoint)": "save_checkpoint (",
    "finish_job": "finish (",
    "evaluation after each epoch": "evaluate (",
    "the training steps": "train (",
}
# Where one training step's time goes, in the floor loop.
STEP_PARTS = {
    "backward (autograd)": "/torch/autograd/",
    "Adam (fused)": "/torch/optim/",
    "forward + loss (torch.nn)": "/torch/nn/",
    "evaluation": "evaluate (",
    "the loop itself (batch indexing, zero_grad, dispatch)": "floor_train (",
}


def profile_training(bench: TrainingBench, section: Section, floor_threads: int) -> None:
    """Profile one warm job and one floor run (pyinstrument) and write what limits them."""
    torch.set_num_threads(bench.threads)
    run, job_profile = in_process(lambda: bench.job(images=10_000, seed=0))
    torch.set_num_threads(floor_threads)
    floor, floor_profile = in_process(lambda: floor_train(bench.data, JobCreate(), seed=0))
    steps = 3 * -(-10_000 // 64)
    section.para(
        f"**What limits training** (pyinstrument; one warm job of {fmt(run.seconds, 's')} and "
        f"one floor run of {fmt(floor.seconds, 's')}, profiled, so both slower than above). "
        f"The floor is eager PyTorch's per-step cost: {fmt(floor.seconds / steps * 1e6, 'µs')} "
        f"per step of 64 images, most of it the dispatch of ~20 small operators rather than "
        f"arithmetic (the whole step is ~0.6 MFLOP ×3). The job's time beyond the training "
        f"steps is its overhead over the floor:"
    )
    section.table(
        ["where a warm job's time goes", "share"],
        share_rows(job_profile.inclusive_shares(JOB_PARTS).items()),
    )
    section.table(
        ["where a floor step's time goes", "share"],
        share_rows(floor_profile.inclusive_shares(STEP_PARTS).items()),
    )


def _case(cases: list[Case], label: str) -> Case:
    return next(c for c in cases if c.label == label)


def _floor(cases: list[Case]) -> Case:
    floors = [c for c in cases if c.label.startswith("floor")]
    return min(floors, key=lambda c: c.times.median)


def _rows(cases: list[Case]) -> list[list[str]]:
    baseline, floor = cases[0], _floor(cases)
    rows = []
    for c in cases:
        t = c.times.median
        low, high = c.times.spread
        acc = c.accuracy
        rows.append(
            [
                c.label,
                fmt(t, "s"),
                f"{fmt(low)}–{fmt(high)} ({len(c.times.values)})",
                fmt(c.images * EPOCHS / t, "img/s"),
                fmt_ratio(ratio(t, floor.times.median)),
                fmt_ratio(ratio(baseline.times.median, t)),
                "–" if acc is None else f"{acc:.4f}",
            ]
        )
    return rows


HEADERS = [
    "figure",
    "median",
    "min–max (runs)",
    "throughput",
    "÷ floor",
    "speed-up over baseline",
    "final accuracy (median)",
]


def run_training(
    section: Section, root: Path, *, runs: int, big_runs: int, cold_runs: int, profile: bool
) -> TrainingResult:
    """Measure and write the training section; returns the goal figures."""
    bench = TrainingBench(root)
    try:
        threads = bench.threads
        section.para(
            f"3 epochs, batch 64, Adam 1e-3, the first N training images and 1,000 test images; "
            f"run *r* uses seed *r* everywhere. The worker uses the service's defaults "
            f"(MNIST_TORCH_THREADS={bench.settings.torch_threads}, flush every "
            f"{bench.settings.flush_interval_s} s) on a migrated SQLite file; its time runs from "
            f"`claim` to `succeeded` (checkpoint written) and every job was checked to have "
            f"every step's loss and every epoch's accuracy in the database. With `auto` the "
            f"worker process times its own steps at each thread count it may use here and "
            f"keeps the fastest (workers/tuning/threads.py), as the floor below is "
            f"{floor_threads_text()}. Baseline and "
            f"floor time the epochs (training + evaluation), not reading the files. The baseline "
            f"runs with {threads} thread(s) (torch's default of {DEFAULT_THREADS} is slower "
            f"whenever other processes share the cores)."
        )
        cases = bench.measure(10_000, runs, runs, cold_runs)
        section.para("**10,000 images × 3 epochs** (the tutorial's job)")
        section.table(HEADERS, _rows(cases))
        if bench.settings.torch_threads == "auto":
            section.para(
                f"After the last job the worker's thread tuner held {process_tuner().threads} "
                f"thread(s), chosen from {process_tuner().candidates}."
            )

        floor, job, unpersisted = (
            _floor(cases),
            _case(cases, JOB_LABEL),
            _case(cases, UNPERSISTED_LABEL),
        )
        job_vs_floor = ratio(job.times.median, floor.times.median)
        # Paired by round (the two jobs ran back to back): the machine's drift between rounds
        # is larger than what the writes cost.
        writes_share = median(
            [
                ratio(with_writes - without, with_writes)
                for with_writes, without in zip(
                    job.times.values, unpersisted.times.values, strict=True
                )
            ]
        )
        flush_share = ratio(bench.flush.median, job.times.median)
        gap = abs((job.accuracy or 0) - (floor.accuracy or 0))
        baseline_accs = cases[0].accuracies
        noise = max(baseline_accs) - min(baseline_accs) if baseline_accs else 0.0
        section.goal_table(
            [
                [
                    f"job ≤ {JOB_GOAL}× floor",
                    f"{fmt_ratio(job_vs_floor)} ({fmt(job.times.median, 's')} vs "
                    f"{fmt(floor.times.median, 's')}, {floor.label})",
                    verdict(job_vs_floor <= JOB_GOAL),
                ],
                [
                    "same final accuracy within noise",
                    f"job {job.accuracy:.4f}, floor {floor.accuracy:.4f}, baseline "
                    f"{cases[0].accuracy:.4f} (baseline's spread over seeds {noise:.4f})",
                    verdict(gap <= max(noise, 0.01)),
                ],
                [
                    f"metric writes ≤ {METRIC_WRITES_GOAL:.0%} of a job",
                    f"{writes_share:.1%} (with − without persistence, ÷ with, median over "
                    f"rounds); time inside "
                    f"flushes {flush_share:.1%} ({fmt(bench.flush.median * 1000, 'ms')})",
                    verdict(writes_share <= METRIC_WRITES_GOAL),
                ],
            ],
        )
        best_threads = next(t for t in floor_threads() if floor_label(t) == floor.label)
        if profile:
            profile_training(bench, section, best_threads)
        if big_runs:
            big = bench.measure(60_000, big_runs, min(big_runs, 2), 0, (best_threads,))
            section.para(
                "**60,000 images × 3 epochs** (the baseline at most 2 runs, as it takes the "
                "longest; the floor at the thread count that won on 10,000 images)"
            )
            section.table(HEADERS, _rows(big))
        return TrainingResult(
            floor.times.median,
            job.times.median,
            job_vs_floor,
            writes_share,
            gap,
            cases[0].times.median,
        )
    finally:
        bench.close()
