"""Sweeps' rows: create, read, list, cancel, delete, and :func:`settle`, the one rule that
ends a sweep, run in the transaction of every write that ends one of its trials.

Lock order, on PostgreSQL: a trial's job row first, then the sweep's row (:func:`settle`
locks it). Every path that ends jobs writes them before it settles their sweeps, so two of
them never wait on each other in a circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, select
from sqlalchemy.orm import Session

from service.clock import new_job_id
from service.schemas import JobCreate
from service.status import JobStatus, SweepStatus
from service.store import model_repo
from service.store.cursors import newest_first
from service.store.tables import Job, ModelAlias, Sweep

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def create_sweep(
    session: Session,
    *,
    params: dict[str, Any],
    search: dict[str, Any],
    promote: str | None,
    now: datetime,
) -> Sweep:
    """Insert a running sweep (its trials are inserted by the caller, in this transaction)."""
    sweep = Sweep(
        id=new_job_id(),
        status=SweepStatus.RUNNING.value,
        params=params,
        search=search,
        promote=promote,
        cancel_requested=False,
        created_at=now,
    )
    session.add(sweep)
    session.flush()
    return sweep


def get_sweep(session: Session, sweep_id: str) -> Sweep | None:
    """The sweep with this id, or None."""
    return session.get(Sweep, sweep_id)


def lock_sweep(session: Session, sweep_id: str) -> Sweep | None:
    """The sweep read afresh and locked until the transaction ends, or None.

    On PostgreSQL ``FOR NO KEY UPDATE``: two settles take it in turn, but it does not wait
    for the key-share lock that a trial's own write may hold on the sweep (PostgreSQL checks
    ``jobs.sweep_id``'s reference again when a transaction updates a job row twice), which
    ``FOR UPDATE`` would, in a circle with the other trial's transaction. SQLite's write
    transactions run one at a time.
    """
    stmt = select(Sweep).where(Sweep.id == sweep_id).with_for_update(key_share=True)
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def list_sweeps(
    session: Session, *, status: SweepStatus | None, limit: int, cursor: str | None
) -> tuple[list[Sweep], str | None]:
    """A page of sweeps, newest first, and the cursor of the next page (None on the last)."""
    stmt = select(Sweep)
    if status is not None:
        stmt = stmt.where(Sweep.status == status.value)
    return newest_first(
        session, stmt, Sweep.created_at, limit=limit, cursor=cursor, source="GET /sweeps"
    )


# What a sweep's reading and ending need of each trial: plain columns, no ORM instances (a
# sweep's page is polled while its trials train: the ORM cost ~4 of its ~6 ms).
# A trial's parameters are JobCreate's fields, each stored in the job's column of its name.
_TRIAL_COLUMNS = (
    Job.id,
    Job.status,
    Job.epoch,
    Job.accuracy,
    Job.checkpoint,
    Job.created_at,
    *(getattr(Job, name) for name in JobCreate.model_fields),
)


def ended_before(session: Session, cutoff: datetime, *, limit: int) -> list[str]:
    """Up to ``limit`` ended sweeps that finished before ``cutoff`` and of whose trials no
    alias names one, oldest first: what retention deletes, each with its trials (or without
    any: all deleted one by one). As :func:`service.store.job_repo.ended_before` leaves an
    aliased job out (so a batch of kept ones never hides the deletable behind them)."""
    aliased = (
        select(ModelAlias.name)
        .join(Job, Job.id == ModelAlias.job_id)
        .where(Job.sweep_id == Sweep.id)
        .exists()
    )
    stmt = (
        select(Sweep.id)
        .where(Sweep.status != SweepStatus.RUNNING.value, Sweep.finished_at < cutoff, ~aliased)
        .order_by(Sweep.finished_at, Sweep.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def trials(session: Session, sweep_id: str) -> list[Row[Any]]:
    """The sweep's trials as rows (its columns by name), in the order they were queued."""
    return trials_of(session, [sweep_id])[sweep_id]


def trials_of(session: Session, sweep_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
    """Each of these sweeps' trials as rows, in the order they were queued; one query."""
    found: dict[str, list[Row[Any]]] = {sweep_id: [] for sweep_id in sweep_ids}
    if found:
        stmt = select(Job.sweep_id, *_TRIAL_COLUMNS).where(Job.sweep_id.in_(found))
        rows: list[Row[Any]] = list(session.execute(stmt.order_by(Job.created_at, Job.id)))
        for row in rows:
            found[str(row.sweep_id)].append(row)
    return found


def tally(trials: Sequence[Row[Any]]) -> dict[JobStatus, int]:
    """How many of ``trials`` are in each state (every state present, 0 when none): the one
    count of a sweep's trials, for its answer, a page of sweeps and its ending."""
    counts = dict.fromkeys(JobStatus, 0)
    for trial in trials:
        counts[JobStatus(trial.status)] += 1
    return counts


def best_of(trials: Sequence[Row[Any]]) -> Row[Any] | None:
    """The succeeded trial of highest accuracy; of equals, the earliest queued (``trials`` in
    the order :func:`trials` reads them). The one rule for a sweep's answer and its alias."""
    best: Row[Any] | None = None
    for trial in trials:
        if trial.status != JobStatus.SUCCEEDED or trial.accuracy is None:
            continue
        if best is None or trial.accuracy > best.accuracy:
            best = trial
    return best


def trial_ids(session: Session, sweep_id: str) -> list[str]:
    """The ids of the sweep's trials, in the order they were queued."""
    stmt = select(Job.id).where(Job.sweep_id == sweep_id).order_by(Job.created_at, Job.id)
    return list(session.scalars(stmt))


def trial_aliases(session: Session, sweep_id: str) -> dict[str, list[str]]:
    """The alias names pointing at each trial of the sweep (trials without one left out), as
    :func:`model_repo.aliases_of` answers for a list of jobs; one query, whatever the trials."""
    stmt = (
        select(ModelAlias.job_id, ModelAlias.name)
        .join(Job, Job.id == ModelAlias.job_id)
        .where(Job.sweep_id == sweep_id)
        .order_by(ModelAlias.name)
    )
    found: dict[str, list[str]] = {}
    for job_id, name in session.execute(stmt):
        found.setdefault(job_id, []).append(name)
    return found


def request_cancel(session: Session, sweep: Sweep) -> None:
    """Remember that the sweep was cancelled: it ends ``cancelled`` once its trials have."""
    sweep.cancel_requested = True
    session.flush()


def delete_sweep(session: Session, sweep_id: str) -> None:
    """Delete a sweep's row; the caller has deleted its trials (a reference keeps it else)."""
    session.execute(delete(Sweep).where(Sweep.id == sweep_id))


def unfinished(session: Session, sweep_id: str) -> bool:
    """Whether any trial of the sweep is queued or running: one probe of the index of
    ``(sweep_id, status)``, whatever the sweep's size (:func:`settle` asks it at every
    trial's end)."""
    trial = select(Job.id).where(Job.sweep_id == sweep_id, Job.status.in_(UNFINISHED))
    return bool(session.scalar(select(trial.exists())))


def count_by_status(session: Session, sweep_id: str) -> dict[JobStatus, int]:
    """:func:`tally` of the sweep's trials counted by the database, no trial read."""
    counts = dict.fromkeys(JobStatus, 0)
    stmt = select(Job.status, func.count()).where(Job.sweep_id == sweep_id).group_by(Job.status)
    for status, count in session.execute(stmt):
        counts[JobStatus(status)] = count
    return counts


def settle(session: Session, sweep_id: str, now: datetime) -> None:
    """End the sweep if none of its trials is queued or running any more; else nothing.

    Run in the transaction that ended a trial, after that write: the sweep's row is locked
    first, so of two trials ending at once the second to commit sees the first ended, and
    exactly one of them ends the sweep. It ends ``cancelled`` if it was cancelled or every
    trial was, else ``succeeded`` when a trial succeeded, ``failed`` when none did. A
    succeeded sweep with ``promote`` points that alias at its best trial, as
    ``PUT /models/aliases/{name}`` does:
    the model's row locked (shared) and the alias upserted (:func:`model_repo.set_alias`).

    Only the end of a sweep's last trial reads more than one index probe
    (:func:`unfinished`): reading every trial at every trial's end made a sweep's cost grow
    with the square of its trials (61% of a worker's time in a 10,000-trial sweep). The last
    counts them in the database, and reads them only to choose the trial it promotes.
    """
    sweep = lock_sweep(session, sweep_id)
    if sweep is None or sweep.status != SweepStatus.RUNNING:
        return
    if unfinished(session, sweep_id):
        return
    counts = count_by_status(session, sweep_id)
    # Every trial cancelled (one by one, as their jobs) is a cancelled sweep: "failed" with
    # no trial failed said what did not happen.
    if sweep.cancel_requested or counts[JobStatus.CANCELLED] == sum(counts.values()):
        status = SweepStatus.CANCELLED
    elif counts[JobStatus.SUCCEEDED]:
        status = SweepStatus.SUCCEEDED
    else:
        status = SweepStatus.FAILED
    sweep.status, sweep.finished_at = status.value, now
    session.flush()
    if status is not SweepStatus.SUCCEEDED or sweep.promote is None:
        return
    best = best_of(trials(session, sweep_id))
    if best is None or best.checkpoint is None:
        return
    locked = select(Job.id).where(Job.id == best.id).with_for_update(read=True)
    if session.scalar(locked) is not None:
        model_repo.set_alias(session, name=sweep.promote, job_id=best.id, now=now)


def settle_all(session: Session, sweep_ids: Iterable[str | None], now: datetime) -> None:
    """:func:`settle` each of these sweeps (None: a job of no sweep), in id order, so two
    transactions that end trials of the same sweeps lock their rows in the same order."""
    for sweep_id in sorted({s for s in sweep_ids if s is not None}):
        settle(session, sweep_id, now)


def job_ended(session: Session, job_id: str, now: datetime) -> None:
    """A job has just reached a terminal state in this transaction: settle its sweep, if any."""
    sweep_id = session.scalar(select(Job.sweep_id).where(Job.id == job_id))
    settle_all(session, [sweep_id], now)
