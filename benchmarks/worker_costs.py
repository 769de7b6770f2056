"""Where the worker's own time goes: each part of its bookkeeping switched off in turn.

The worker (:class:`workers.worker.Worker`, in this process, no API) trains the default job on
SQLite and on PostgreSQL. Each round runs the floor, then one job as shipped and one job per
part switched off, in alternating order (forward in even rounds, backward in odd ones, so that
no variant always follows the floor). A part is switched off by replacing one function of the
worker for that job only; the replacement counts its calls, and a variant whose replacement
was never called raises (a part that was not switched off must not pass for a free one). A
part's cost is the median, over the rounds, of the job as shipped minus the job without it in
the same round, with a distribution-free 95% interval: this host's speed drifts between
rounds, and pairs within a round cancel that drift, which a difference of medians keeps.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.floor import Floors, floor_data, floor_threads_text
from benchmarks.report import Section
from benchmarks.result_service import database, databases_here
from benchmarks.stats import fmt, fmt_ratio, median, median_interval, ratio
from service.clock import utcnow
from service.schemas import JobCreate
from service.settings import Settings
from service.status import JobStatus
from service.store import job_repo, metric_repo
from service.store.artifacts import backends as artifact_backends
from service.store.artifacts import repo as artifacts_repo
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import EpochMetric, Job, TrainStep
from workers import resume
from workers.data import Mnist
from workers.reporting import buffer
from workers.tuning.threads import process_tuner
from workers.worker import Worker

SHIPPED = "as shipped"


class Hits:
    """How many calls a replacement skipped during a job."""

    def __init__(self) -> None:
        self.count = 0


# (the original, the skips' counter, *its arguments) -> what the call returns instead
Replacement = Callable[..., Any]


@contextlib.contextmanager
def replaced(owner: object, attr: str, replacement: Replacement, skipped: Hits) -> Iterator[None]:
    """``owner.attr`` calls ``replacement(original, skipped, *args)`` until the block ends."""
    original = getattr(owner, attr)

    def swapped(*args: Any, **kwargs: Any) -> Any:
        return replacement(original, skipped, *args, **kwargs)

    setattr(owner, attr, swapped)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def skip(_original: Replacement, skipped: Hits, *_args: Any, **_kwargs: Any) -> None:
    """A replacement that does nothing."""
    skipped.count += 1


def _no_write(_original: Replacement, skipped: Hits, *_args: Any, **_kwargs: Any) -> bool:
    skipped.count += 1
    return False  # "no cancel asked", as a stored flush would say


def _put_unless_state(
    original: Replacement, skipped: Hits, session: Any, blob: Any, **kwargs: Any
) -> None:
    if blob.kind == artifacts_repo.RESUME:
        # A flush stores only the newest state written since the last one, which replaces the
        # older: when two epochs' states meet in one flush (short epochs), its one put keeps
        # out both. So the put counts every state up to its epoch, whoever wins that race.
        skipped.count = max(skipped.count + 1, blob.epoch or 0)
    else:  # the final checkpoint
        original(session, blob, **kwargs)


def _save_unless_state(original: Replacement, skipped: Hits, obj: Any, path: Path) -> None:
    if path.name.endswith(".resume.pt"):
        skipped.count += 1
        torch.save(obj, io.BytesIO())  # serialised as the database's states are: not stored
    else:  # the final checkpoint
        original(obj, path)


def _one_per_job(_params: JobCreate) -> int:
    return 1


def _one_per_state(params: JobCreate) -> int:
    return params.epochs - 1  # after every epoch but the last


def _count(session: Session, table: type[TrainStep] | type[EpochMetric], job_id: str) -> int:
    return session.scalar(select(func.count()).where(table.job_id == job_id)) or 0


@dataclass(frozen=True)
class Part:
    """A part of the worker's bookkeeping and how a job runs without it."""

    label: str  # the table's row: the job without this part
    skips: str  # what that job does not do
    # (owner, attribute, replacement) to swap in for the job; none: settings alone
    swaps: tuple[tuple[object, str, Replacement], ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    # the fewest calls the swaps must skip in a job: fewer, and the part was not switched off
    min_skips: Callable[[JobCreate], int] = _one_per_job
    # rows of the job that must be missing when it ends (steps, epochs), if any
    none_of: type[TrainStep] | type[EpochMetric] | None = None


def parts() -> list[Part]:
    """The variants, the job as shipped first."""
    most = process_tuner().candidates[-1]  # the most threads the tuner chooses among
    return [
        Part(SHIPPED, "nothing"),
        Part(
            "no database writes while training",
            "the flushes' transactions (steps, epochs, naming the states, the lease's renewal; "
            "on PostgreSQL the states' rows too)",
            ((buffer.ProgressBuffer, "write", _no_write),),
            none_of=EpochMetric,
        ),
        Part(
            "no training states",
            "the states after each epoch but the last: serialising, storing, naming (the copy "
            "taken at the epoch's end stays)",
            ((resume.StateWriter, "submit", skip),),
            min_skips=_one_per_state,
        ),
        Part(
            "states not stored",
            "storing the states' bytes (PostgreSQL: the row; SQLite: the file and its fsync); "
            "they are still serialised and named",
            (
                (artifacts_repo, "put", _put_unless_state),
                (artifact_backends, "atomic_torch_save", _save_unless_state),
            ),
            min_skips=_one_per_state,
        ),
        Part(
            "no step rows",
            "inserting the steps' rows (the flushes still run)",
            ((metric_repo, "insert_steps", skip),),
            none_of=TrainStep,
        ),
        Part(
            f"{most} threads, no tuner",
            f"the thread tuner (warm: the process's, as a worker's after its first job): "
            f"MNIST_TORCH_THREADS={most} instead of auto",
            settings={"torch_threads": most},
        ),
    ]


@dataclass
class Costs:
    """One database's jobs, by variant, and the floors of the same rounds."""

    name: str
    jobs: dict[str, list[float]] = field(default_factory=dict)  # seconds, in round order
    floors: Floors = field(default_factory=Floors)

    @property
    def floor_s(self) -> float:
        """The fastest thread count's median floor."""
        return self.floors.seconds

    def cost_ms(self, label: str) -> list[float]:
        """Per round: the job as shipped minus the job without this part, in ms."""
        pairs = zip(self.jobs[SHIPPED], self.jobs[label], strict=True)
        return [(shipped - without) * 1000 for shipped, without in pairs]


def run_one_job(
    part: Part, settings: Settings, sessions: sessionmaker[Session], params: JobCreate
) -> float:
    """Train one job with ``part`` switched off; its started_at → finished_at in seconds.

    Raises when the part was not switched off: its swaps skipped fewer calls than it must, or
    rows it keeps out of the database are there."""
    skipped = Hits()
    with contextlib.ExitStack() as stack:
        for owner, attr, replacement in part.swaps:
            stack.enter_context(replaced(owner, attr, replacement, skipped))
        worker = Worker(settings.model_copy(update=part.settings), sessions, show_progress=False)
        with sessions.begin() as session:
            job_id = job_repo.create_job(session, params, max_attempts=1, now=utcnow()).id
        worker.run(max_jobs=1)
    if part.swaps and skipped.count < part.min_skips(params):
        raise RuntimeError(
            f"{part.label}: {skipped.count} calls skipped, fewer than "
            f"{part.min_skips(params)}: not switched off"
        )
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"{part.label}: job {job_id} did not succeed ({job and job.error})")
        if part.none_of is not None and _count(session, part.none_of, job_id):
            raise RuntimeError(f"{part.label}: job {job_id} has {part.none_of.__tablename__} rows")
        assert job.started_at is not None
        assert job.finished_at is not None
        return (job.finished_at - job.started_at).total_seconds()


def measure(
    kind: str,
    root: Path,
    floor_data: Mnist,
    params: dict[str, Any],
    *,
    rounds: int,
    data_root: Path,
) -> Costs:
    """``rounds`` rounds of (floor at each thread count, a job per variant) on a fresh database."""
    variants = parts()
    costs = Costs(kind, jobs={p.label: [] for p in variants})
    with database(kind, root) as url:
        engine = make_engine(url)
        try:
            sessions = make_sessionmaker(engine)
            settings = Settings(
                database_url=url,
                data_dir=data_root,
                download=False,
                checkpoint_dir=root / "models",
                device="cpu",
                pack_max=1,
            )
            run_one_job(variants[0], settings, sessions, JobCreate.model_validate(params))  # warm
            for r in range(rounds):
                job = JobCreate.model_validate({**params, "seed": r})
                costs.floors.run(floor_data, job, seed=r)
                for part in variants if r % 2 == 0 else variants[::-1]:
                    costs.jobs[part.label].append(run_one_job(part, settings, sessions, job))
                print(
                    f"  worker costs {kind} round {r + 1}/{rounds}: "
                    + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in costs.jobs.items()),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            engine.dispose()
    return costs


def run_worker_costs(
    section: Section,
    root: Path,
    *,
    rounds: int,
    params: dict[str, Any] | None = None,
    data_root: Path | None = None,
) -> list[Costs]:
    """Measure on SQLite and PostgreSQL (where it answers) and write the section."""
    kinds, why_not = databases_here()
    with floor_data(data_root) as (data, mnist):
        results = [
            measure(kind, root / kind, mnist, params or {}, rounds=rounds, data_root=data)
            for kind in kinds
        ]
    write_section(section, results, rounds=rounds, why_not=why_not)
    return results


def write_section(
    section: Section, results: list[Costs], *, rounds: int, why_not: str | None
) -> None:
    """One table per database: each variant's job, and what the part it skips costs."""
    section.para(
        "What the worker's own time (`started_at` → `finished_at`) holds beyond the bare loop, "
        "part by part. The worker trains the tutorial's default job in the benchmark's "
        "process (no API, no client), on a fresh SQLite file (training states as files) and a "
        "fresh PostgreSQL database (states as rows), with the defaults but "
        "`MNIST_PACK_MAX=1`. Each round runs the floor (the bare eager loop, "
        f"{floor_threads_text()}) and then one job as shipped and one job with each part "
        "switched off, "
        "in alternating order; the part is switched off by replacing one function of the "
        "worker for that job (checked: a variant whose replacement skipped fewer calls than "
        "it must, or whose job left the rows it keeps out, stops the run). A part's cost is "
        "the median over "
        f"the {rounds} rounds of the job as shipped minus the job without it, in the same "
        "round, with a distribution-free interval that holds it with at least 95% from 6 rounds "
        "on (order statistics; the host's speed drifts between rounds, and a pair shares "
        "its round's). The costs overlap (on PostgreSQL no database writes also means no "
        "state stored) and do not add up exactly; an interval that holds 0 says the part's "
        "cost is below what this host can tell apart. Without step rows, each epoch's write "
        "on PostgreSQL finds the steps it checks missing and deletes before storing none "
        "(`store_missing_steps`): that row's cost comes out a little low."
    )
    for costs in results:
        floor = costs.floor_s
        rows: list[list[str]] = [
            [costs.name, "floor (eager PyTorch, nothing stored)", "—", fmt(floor, "s"), "1.00×", ""]
        ]
        for part in parts():
            job_s = median(costs.jobs[part.label])
            cost = ""
            if part.label != SHIPPED:
                diffs = costs.cost_ms(part.label)
                low, high, _ = median_interval(diffs)
                cost = f"{fmt(median(diffs), 'ms')} [{fmt(low)}, {fmt(high)}]"
            rows.append(
                [
                    costs.name,
                    part.label,
                    part.skips,
                    fmt(job_s, "s"),
                    fmt_ratio(ratio(job_s, floor)),
                    cost,
                ]
            )
        section.table(
            [
                "database",
                "job",
                "what it skips",
                "median",
                "÷ floor",
                "the part's cost, median [95%]",
            ],
            rows,
        )
    if why_not is not None:
        section.para(f"PostgreSQL was not measured: the server did not answer ({why_not}).")
