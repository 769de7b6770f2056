"""The metrics series: every step's loss and every epoch's accuracy, read a page at a time.

The reads run on the driver's cursor (:func:`service.store.engines.driver_rows`), handed
whatever the caller reads through; the series is written by
:func:`service.store.queue_repo.record_progress`, fenced with the job's progress through
:func:`insert_steps` (and, after a crash of a PostgreSQL server, mended by
:func:`store_missing_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, select, text
from sqlalchemy.orm import Session

from service.store.engines import Reader, driver_rows
from service.store.tables import EpochMetric, Job, TrainStep

_JOB_STATE = select(Job.status, Job.attempt).where(Job.id == bindparam("job_id"))
_STEPS_PAGE = (
    select(TrainStep.step, TrainStep.epoch, TrainStep.loss, TrainStep.examples_seen)
    .where(TrainStep.job_id == bindparam("job_id"), TrainStep.step > bindparam("after_step"))
    .order_by(TrainStep.step)
    .limit(bindparam("limit"))
)
_EPOCHS_AFTER = (
    select(EpochMetric.epoch, EpochMetric.accuracy, EpochMetric.examples_seen)
    .where(EpochMetric.job_id == bindparam("job_id"), EpochMetric.epoch > bindparam("after"))
    .order_by(EpochMetric.epoch)
)


# PostgreSQL: a flush's steps as one statement over four arrays. psycopg's executemany runs one
# INSERT per row: for 160 rows 1.7 ms of the server's CPU and 2.7 ms of the worker's (Python,
# on the flush thread, holding the GIL the training loop needs), against 0.7 and 0.85 ms so
# (docs/benchmarks.md). On two cores both come out of the training beside it.
_STEPS_FROM_ARRAYS = text(
    "INSERT INTO train_steps (job_id, step, epoch, loss, examples_seen) "
    "SELECT :job_id, * FROM unnest(CAST(:steps AS integer[]), CAST(:epochs AS integer[]), "
    "CAST(:losses AS double precision[]), CAST(:examples AS integer[]))"
)
# SQLite: the same rows as plain tuples through the driver's executemany (sqlite3's qmark
# style), without SQLAlchemy building a parameter dictionary per row.
_STEPS_SQLITE = (
    "INSERT INTO train_steps (job_id, step, epoch, loss, examples_seen) VALUES (?, ?, ?, ?, ?)"
)


def job_state(db: Reader, job_id: str) -> tuple[str, int] | None:
    """A job's status and attempt (the run its steps are of), or None when there is no such
    job."""
    rows = driver_rows(db, _JOB_STATE, {"job_id": job_id})
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


def read_steps(db: Reader, job_id: str, *, after_step: int, limit: int) -> list[dict[str, Any]]:
    """Steps numbered above ``after_step``, in order, at most ``limit``."""
    rows = driver_rows(
        db, _STEPS_PAGE, {"job_id": job_id, "after_step": after_step, "limit": limit}
    )
    return [{"step": s, "epoch": e, "loss": x, "examples_seen": n} for s, e, x, n in rows]


def read_epochs(db: Reader, job_id: str, *, after_epoch: int = 0) -> list[dict[str, Any]]:
    """The recorded epoch accuracies of a job numbered above ``after_epoch``, in order."""
    rows = driver_rows(db, _EPOCHS_AFTER, {"job_id": job_id, "after": after_epoch})
    return [{"epoch": e, "accuracy": a, "examples_seen": n} for e, a, n in rows]


def store_missing_steps(session: Session, job_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Store ``rows`` again when any of them is missing (a crash of the PostgreSQL server lost
    a commit that did not wait for the disk); one count when none is, as after every crash-free
    epoch. SQLite's commits are never given up this way: nothing to check there."""
    if session.get_bind().dialect.name != "postgresql":
        return
    first, last = int(rows[0]["step"]), int(rows[-1]["step"])
    in_range = and_(TrainStep.job_id == job_id, TrainStep.step >= first, TrainStep.step <= last)
    if session.scalar(select(func.count()).where(in_range)) == len(rows):
        return
    session.execute(delete(TrainStep).where(in_range))
    insert_steps(session, job_id, rows)


def insert_steps(session: Session, job_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Store a job's ``train_steps`` rows (:meth:`service.steps.StepPlan.step_row`'s)."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(
            _STEPS_FROM_ARRAYS,
            {
                "job_id": job_id,
                "steps": [r["step"] for r in rows],
                "epochs": [r["epoch"] for r in rows],
                "losses": [r["loss"] for r in rows],
                "examples": [r["examples_seen"] for r in rows],
            },
        )
    else:  # the driver's executemany: SQLAlchemy's per-row parameters cost more than the insert
        connection.exec_driver_sql(
            _STEPS_SQLITE,
            [(job_id, r["step"], r["epoch"], r["loss"], r["examples_seen"]) for r in rows],
        )
