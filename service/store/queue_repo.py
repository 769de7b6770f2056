"""The queue protocol: claim, fenced progress, lease renewal, finish, release, rewind.

Writes a worker makes for a job are fenced on ``(id, attempt, worker, status='running')``:
when the fence matches no row, the worker has lost the job and :class:`LeaseLost` is raised
before anything else of the transaction is written.

Every change a waiter may be waiting for publishes a wake-up in its transaction
(:mod:`service.store.wakeups`): a job that becomes claimable wakes idle workers
(``JOB_QUEUED``), and a job's status and metrics wake its event streams (``JOB_PROGRESS``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Update, and_, bindparam, case, delete, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.errors import LeaseLost
from service.status import JobStatus
from service.steps import StepPlan
from service.store import engines, metric_repo, wakeups
from service.store.artifacts import repo as artifacts_repo
from service.store.artifacts.repo import Blob
from service.store.sweeps import repo as sweep_repo
from service.store.tables import EpochMetric, Job, TrainStep
from service.store.upkeep import leases
from service.store.upkeep.db_clock import database_time

# What a running job given back to the queue becomes: queued, held by no worker.
_REQUEUED: dict[str, Any] = {
    "status": JobStatus.QUEUED,
    "worker_id": None,
    "lease_expires_at": None,
    "heartbeat_at": None,
}


def _lost(job_id: str, attempt: int) -> LeaseLost:
    return LeaseLost(f"job {job_id} attempt {attempt} is no longer this worker's")


def _update_jobs(session: Session, where: Any, values: dict[str, Any]) -> int:
    """UPDATE the jobs ``where`` matches, without loading them; how many rows it changed."""
    result = session.execute(
        update(Job).where(where).values(**values).execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _update_fenced(
    session: Session, job_id: str, attempt: int, worker_id: str, values: dict[str, Any]
) -> None:
    """UPDATE the job this worker runs as ``attempt``; :class:`LeaseLost` when it no longer does."""
    if not _update_jobs(session, leases.fence(job_id, attempt, worker_id), values):
        raise _lost(job_id, attempt)


def _requeue(
    session: Session, job_id: str, attempt: int, worker_id: str, values: dict[str, Any]
) -> None:
    """Queue the job this worker runs as ``attempt`` again (fenced), with ``values``; wake the
    idle workers (the job is claimable again) and the job's streams."""
    _update_fenced(session, job_id, attempt, worker_id, {**_REQUEUED, **values})
    wakeups.publish(session, wakeups.JOB_QUEUED)
    wakeups.publish(session, wakeups.JOB_PROGRESS, job_id)


def _ended(session: Session, job_id: str, now: datetime) -> None:
    """What follows a job's end, whichever: its training state dropped, its streams woken, its
    sweep told."""
    artifacts_repo.drop(session, job_id, kind=artifacts_repo.RESUME)
    wakeups.publish(session, wakeups.JOB_PROGRESS, job_id)
    sweep_repo.job_ended(session, job_id, now)


def claim_job(
    session: Session,
    *,
    worker_id: str,
    lease_s: float,
    device: str,
    now: datetime,
    settle_leases: bool = True,
) -> Job | None:
    """Atomically take the oldest claimable job for this worker, or None.

    Claimable: queued, or running with an expired lease and attempts left. One UPDATE whose
    subquery picks the row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's IMMEDIATE
    transaction serialises claims), so two workers never take the same attempt.

    ``settle_leases`` first settles the leases that ran out (:func:`leases.expire_lost_jobs`): the
    jobs that can no longer run end, and the others go back to the queue. The claim takes an
    expired job whether or not it ran, so a worker may settle less often than it claims
    (:meth:`workers.worker.Worker.claim`).

    A retried job resumes after its last finished epoch (``resume_epoch``, whose training state
    an earlier attempt saved): the metrics past that point are removed in the same transaction,
    so the series stays one consistent run with no duplicated and no missing steps.
    """
    if settle_leases:
        leases.expire_lost_jobs(session, now=now)
    params = {"now": now, "lease_s": lease_s, "worker_id": worker_id, "device": device}
    job: Job | None = session.scalars(leases.claim_statement(), params).one_or_none()
    if job is None:
        return None
    rewind_to_epoch(session, job, job.resume_epoch)
    wakeups.publish(session, wakeups.JOB_PROGRESS, job.id)
    return job


def rewind_to_epoch(session: Session, job: Job, epoch: int) -> None:
    """Drop the metrics recorded after ``epoch`` and set the job's progress back to it.

    Nothing to do when the job's progress is already there (a first attempt: the claim's
    common case, spared three statements). Steps and progress are written in one transaction,
    so no row lies past ``job.step``.
    """
    keep_steps = StepPlan.of(job).steps_before(epoch)
    if job.step == keep_steps and job.epoch == epoch and (epoch or job.resume_checkpoint is None):
        return
    session.execute(
        delete(TrainStep).where(TrainStep.job_id == job.id, TrainStep.step > keep_steps)
    )
    session.execute(
        delete(EpochMetric).where(EpochMetric.job_id == job.id, EpochMetric.epoch > epoch)
    )
    accuracy = None
    if epoch > 0:
        accuracy = session.scalar(
            select(EpochMetric.accuracy).where(
                EpochMetric.job_id == job.id, EpochMetric.epoch == epoch
            )
        )
    values: dict[str, Any] = {"step": keep_steps, "epoch": epoch, "accuracy": accuracy}
    if epoch == 0:
        values.update(resume_epoch=0, resume_checkpoint=None)
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    for key, value in values.items():
        set_committed_value(job, key, value)


@dataclass(frozen=True)
class Progress:
    """What a worker reports in one flush."""

    steps: Sequence[dict[str, Any]]  # rows for train_steps: step, epoch, loss, examples_seen
    epochs: Sequence[dict[str, Any]]  # rows for epoch_metrics: epoch, accuracy, examples_seen
    step: int
    epoch: int
    accuracy: float | None
    resume_checkpoint: str | None = None  # saved with the state after ``resume_epoch``
    resume_epoch: int | None = None  # None: ``epoch``
    resume_blob: Blob | None = None  # its bytes, when artifacts live in the database
    # A retry of a write whose outcome is unknown (its connection broke): its rows replace
    # any the broken write committed.
    replace: bool = False
    unsynced: Sequence[dict[str, Any]] = ()  # steps since the last synchronous write


def record_progress(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    worker_id: str,
    progress: Progress,
    lease_s: float,
    now: datetime,
) -> bool:
    """Write buffered metrics, advance progress and renew the lease; True if cancel was asked.

    Raises :class:`LeaseLost` (writing nothing) when this attempt no longer owns the job.

    A flush of steps alone does not wait, on PostgreSQL, for its WAL to reach the disk
    (:func:`engines.commit_without_waiting_for_disk`): a crash of the database server may lose
    its last fraction of a second, never make it inconsistent. That is the durability the
    SQLite store gives every write (WAL, ``synchronous=NORMAL``), and all such a flush needs:
    steps lost that way are steps a retry trains again from its last resume point. A flush
    that records an epoch or names a resume point waits: the worker deletes older training
    states once it returns. It stores again the steps a crash lost since the last such write
    (``unsynced``).
    """
    if not progress.epochs and progress.resume_checkpoint is None:
        engines.commit_without_waiting_for_disk(session)
    values: dict[str, Any] = {"step": progress.step, "epoch": progress.epoch, "heartbeat_at": now}
    if progress.accuracy is not None:
        values["accuracy"] = progress.accuracy
    if progress.resume_checkpoint is not None:
        values["resume_checkpoint"] = progress.resume_checkpoint
        values["resume_epoch"] = (
            progress.epoch if progress.resume_epoch is None else progress.resume_epoch
        )
    cancel_asked = _renew_lease(session, job_id, attempt, worker_id, lease_s, values)
    if progress.unsynced:
        metric_repo.store_missing_steps(session, job_id, progress.unsynced)
    if progress.replace:
        _forget_rows(session, job_id, progress)
    if progress.resume_blob is not None:  # after the fence: a lost worker stores nothing
        artifacts_repo.put(session, progress.resume_blob, now=now)
    if progress.steps:
        metric_repo.insert_steps(session, job_id, progress.steps)
    if progress.epochs:
        session.connection().execute(
            insert(EpochMetric), [{"job_id": job_id, **r} for r in progress.epochs]
        )
    wakeups.publish(session, wakeups.JOB_PROGRESS, job_id)
    return cancel_asked


def _renew_lease(
    session: Session,
    job_id: str,
    attempt: int,
    worker_id: str,
    lease_s: float,
    values: dict[str, Any],
) -> bool:
    """The fenced UPDATE of a flush or a heartbeat (a lease of ``lease_s`` from now, and
    ``values``' columns); True if cancel was asked, :class:`LeaseLost` when this attempt no
    longer holds the job."""
    params = {**leases.fence_values(job_id, attempt, worker_id), "lease_s": lease_s, **values}
    row = session.connection().execute(_lease_update(tuple(values)), params).first()
    if row is None:
        raise _lost(job_id, attempt)
    return bool(row[0])


@functools.cache
def _lease_update(columns: tuple[str, ...]) -> Update:
    """:func:`_renew_lease`'s statement, built once per set of columns and run on the session's
    Connection (it names no ORM entity to synchronise): built anew and run through the ORM, it
    took a third of a flush's CPU on the flush thread, beside the training (docs/benchmarks.md,
    "a flush's CPU on the writing thread")."""
    return (
        update(Job)
        .where(leases.FENCE)
        .values({c: bindparam(c) for c in columns})
        .values(lease_expires_at=database_time(bindparam("lease_s", type_=Float())))
        .returning(Job.cancel_requested)
    )


def _forget_rows(session: Session, job_id: str, progress: Progress) -> None:
    """Delete the rows ``progress`` is about to insert, where an earlier try stored them."""
    if progress.steps:
        first = min(int(r["step"]) for r in progress.steps)
        session.execute(
            delete(TrainStep).where(TrainStep.job_id == job_id, TrainStep.step >= first)
        )
    if progress.epochs:
        epochs = [int(r["epoch"]) for r in progress.epochs]
        session.execute(
            delete(EpochMetric).where(EpochMetric.job_id == job_id, EpochMetric.epoch.in_(epochs))
        )


def heartbeat(
    session: Session, *, job_id: str, attempt: int, worker_id: str, lease_s: float, now: datetime
) -> bool:
    """Renew the lease without other progress; True if cancel was asked. Fenced."""
    return _renew_lease(session, job_id, attempt, worker_id, lease_s, {"heartbeat_at": now})


def finish_job(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    worker_id: str,
    status: JobStatus,
    now: datetime,
    error: str | None = None,
    checkpoint: str | None = None,
    checkpoint_blob: Blob | None = None,
    unsynced: Sequence[dict[str, Any]] = (),
) -> JobStatus:
    """Move a running job to a terminal state, and say which. Fenced: raises :class:`LeaseLost`.
    One that would succeed ends ``cancelled`` if a cancel was accepted meanwhile
    (:func:`leases.cancel_asked`), its weights not named (a file goes with the job's files).

    ``checkpoint_blob`` (artifacts in the database) is stored by this transaction, so a job
    is never ``succeeded`` without its weights; its training states go with it. ``unsynced``
    are the steps written since the worker's last synchronous write (``Progress.unsynced``):
    a job that ends cancelled or failed before its epoch's write stores again those a crash
    of the PostgreSQL server lost, as that write would have.
    """
    if status == JobStatus.SUCCEEDED and leases.cancel_asked(session, job_id, attempt, worker_id):
        status, checkpoint, checkpoint_blob = JobStatus.CANCELLED, None, None
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "lease_expires_at": None,
        "error": error,
        "resume_checkpoint": None,
    }
    if checkpoint is not None:
        values["checkpoint"] = checkpoint
    if unsynced:  # where a lost commit left it behind; never back (a write behind landed)
        last = int(unsynced[-1]["step"])
        values["step"] = case((Job.step < last, last), else_=Job.step)
    _update_fenced(session, job_id, attempt, worker_id, values)
    if unsynced:
        metric_repo.store_missing_steps(session, job_id, unsynced)
    if checkpoint_blob is not None:
        artifacts_repo.put(session, checkpoint_blob, now=now)
    _ended(session, job_id, now)
    return status


def release_job(
    session: Session, *, job_id: str, attempt: int, worker_id: str, now: datetime
) -> None:
    """Give a running job back to the queue (a worker shutting down), fenced, with one attempt
    more: the worker left on purpose. Its number is not taken back: event ids, training states
    and the fence name a run by it (a stream resumed from the released run's last id under a
    reused number skipped the steps the next run trained again after its rewind)."""
    if not _cancelled_if_asked(session, job_id, attempt, worker_id, now):
        _requeue(session, job_id, attempt, worker_id, {"max_attempts": Job.max_attempts + 1})


# Hand-backs for a fault of the worker's host that spend none of a job's attempts: enough to
# ride out a disk full or read-only for a while (each worker pauses 2 s, then twice as long),
# not a fault that lasts on every host, which then fails the job as its attempts run out.
FREE_HOST_FAULTS = 10


def hand_back(
    session: Session, *, job_id: str, attempt: int, worker_id: str, now: datetime, reason: str
) -> JobStatus | None:
    """Give a running job back to the queue for a fault of the worker's host rather than of
    the job (its checkpoint folder cannot be written, MNIST cannot be read), fenced, as its
    next attempt. The first :data:`FREE_HOST_FAULTS` add an attempt, as a release does: a
    folder full for a few seconds spent every attempt of the jobs that met it within 12 s.
    Past those, past its last attempt it fails with ``reason`` (what clients read: no server
    paths). None when the job runs again, else how it ended (cancelled: asked meanwhile)."""
    if _cancelled_if_asked(session, job_id, attempt, worker_id, now):
        return JobStatus.CANCELLED
    faults = Job.host_faults + 1
    spent = and_(Job.host_faults >= FREE_HOST_FAULTS, Job.attempt >= Job.max_attempts)
    error = f"{reason}; gave up after {attempt} attempts"
    gave_up = {"status": JobStatus.FAILED, "finished_at": now, "lease_expires_at": None}
    ended = {**gave_up, "resume_checkpoint": None, "error": error, "host_faults": faults}
    if _update_jobs(session, and_(leases.fence(job_id, attempt, worker_id), spent), ended):
        _ended(session, job_id, now)
        return JobStatus.FAILED
    free = case((Job.host_faults < FREE_HOST_FAULTS, 1), else_=0)
    again = {"max_attempts": Job.max_attempts + free, "host_faults": faults}
    _requeue(session, job_id, attempt, worker_id, {**again, "error": f"{reason}; retrying"})
    return None


def _cancelled_if_asked(
    session: Session, job_id: str, attempt: int, worker_id: str, now: datetime
) -> bool:
    """End a job given back (released, handed back) ``cancelled`` if a cancel was asked while
    it ran, as a lost worker's job ends (:func:`leases.expire_lost_jobs`): queued again it
    could never be claimed (claims skip cancel-asked jobs), and its sweep would never end.
    Fenced. The row is locked as it is read (:func:`leases.cancel_asked`): a cancel that
    committed between a look that found none and the write that queues the job again left
    it queued, asked to cancel, for good."""
    if not leases.cancel_asked(session, job_id, attempt, worker_id):
        return False
    ended = {"status": JobStatus.CANCELLED, "finished_at": now, "lease_expires_at": None}
    _update_fenced(session, job_id, attempt, worker_id, {**ended, "resume_checkpoint": None})
    _ended(session, job_id, now)
    return True


def forget_resume_point(session: Session, *, job_id: str, attempt: int, worker_id: str) -> None:
    """Start a retried job over (its saved training state is gone). Fenced."""
    job = session.scalars(select(Job).where(leases.fence(job_id, attempt, worker_id))).one_or_none()
    if job is None:
        raise _lost(job_id, attempt)
    rewind_to_epoch(session, job, 0)
    wakeups.publish(session, wakeups.JOB_PROGRESS, job_id)
