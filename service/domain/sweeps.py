"""The sweeps service layer: create (every trial an ordinary queued job), read, list, cancel
and delete, over :mod:`service.store.sweep_repo` and the jobs' own rules.

A sweep never runs anything itself: workers train its trials as they train any job, and
whichever write ends the last trial ends the sweep (:func:`sweep_repo.settle`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Row
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.domain import deletion, jobs
from service.errors import Conflict, InvalidInput, NotFound
from service.schemas.sweeps import (
    BestTrial,
    SweepCreate,
    SweepList,
    SweepRead,
    SweepSummary,
    TrialRead,
    expand,
)
from service.status import SweepStatus
from service.store import job_repo
from service.store.sweeps import repo as sweep_repo
from service.store.tables import Sweep

log = logging.getLogger("service.sweeps")

# Trials are queued in one transaction at one moment; a microsecond apart, they keep their
# order in the queue (claims go by creation), on every page and in the "earliest" of ties.
TRIAL_SPACING = timedelta(microseconds=1)


def _check_trials_steps(spec: SweepCreate, trials: list[Any], max_steps: int) -> None:
    """422 for the first trial over ``MNIST_MAX_JOB_STEPS``, by the jobs' own check."""
    where = "grid" if spec.grid is not None else "random"
    for i, params in enumerate(trials):
        try:
            jobs.check_steps(params, max_steps=max_steps)
        except InvalidInput as exc:
            raise InvalidInput(
                f"{where}: trial {i} ({params.epochs} epochs, batch_size {params.batch_size}, "
                f"trainset_size {params.trainset_size}): {exc.message}",
                details=[{**d, "loc": ["body", where], "trial": i} for d in exc.details or []],
            ) from None


def create(
    session: Session,
    spec: SweepCreate,
    *,
    max_trials: int,
    max_attempts: int,
    max_queued: int,
    max_steps: int,
) -> SweepRead:
    """Queue every trial of ``spec`` as a job of a new sweep, all in one transaction.

    422 for a value no job may have (:func:`expand`) or a trial over the steps budget; 429
    while the queue has no room for all of them (:func:`jobs.check_queue_room`, the cap of
    ``POST /jobs``, which names how many would wait).
    """
    trials = expand(spec, max_trials=max_trials)
    _check_trials_steps(spec, trials, max_steps)
    jobs.check_queue_room(session, adding=len(trials), max_queued=max_queued)
    now = utcnow()
    search = (
        {"grid": spec.grid}
        if spec.grid is not None
        else {"random": spec.random.model_dump() if spec.random else None}
    )
    sweep = sweep_repo.create_sweep(
        session,
        params=spec.params.model_dump(),
        search=search,
        promote=spec.promote,
        now=now,
    )
    job_repo.create_trials(
        session,
        trials,
        sweep_id=sweep.id,
        max_attempts=max_attempts,
        now=now,
        spacing=TRIAL_SPACING,
    )
    session.commit()
    log.info("sweep %s queued with %d trials", sweep.id, len(trials))
    return read(session, sweep.id)


def _summary_fields(
    sweep: Sweep, counts: dict[Any, int], trials: Sequence[Row[Any]]
) -> dict[str, Any]:
    best = sweep_repo.best_of(trials)
    return {
        "id": sweep.id,
        "status": SweepStatus(sweep.status),
        "params": sweep.params,
        "grid": sweep.search.get("grid"),
        "random": sweep.search.get("random"),
        "promote": sweep.promote,
        "created_at": sweep.created_at,
        "finished_at": sweep.finished_at,
        "trials_by_status": counts,
        "best": None
        if best is None or best.accuracy is None
        else BestTrial(job_id=best.id, accuracy=best.accuracy),
    }


def _trial(job: Row[Any]) -> TrialRead:
    return TrialRead(
        job_id=job.id,
        params=jobs.params_of(job),
        status=job.status,
        epoch=job.epoch,
        accuracy=job.accuracy,
    )


def _sweep_or_404(session: Session, sweep_id: str) -> Sweep:
    sweep = sweep_repo.get_sweep(session, sweep_id)
    if sweep is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    return sweep


def read(session: Session, sweep_id: str) -> SweepRead:
    """A sweep and its trials, or 404."""
    sweep = _sweep_or_404(session, sweep_id)
    trials = sweep_repo.trials(session, sweep.id)
    summary = _summary_fields(sweep, sweep_repo.tally(trials), trials)
    return SweepRead.model_validate({**summary, "trials": [_trial(j) for j in trials]})


def list_page(
    session: Session, *, status: SweepStatus | None, limit: int, cursor: str | None
) -> SweepList:
    """A page of sweeps, newest first, with their trials counted by state."""
    sweeps, next_cursor = sweep_repo.list_sweeps(session, status=status, limit=limit, cursor=cursor)
    trials = sweep_repo.trials_of(session, [s.id for s in sweeps])
    return SweepList(
        sweeps=[
            SweepSummary.model_validate(
                _summary_fields(s, sweep_repo.tally(trials[s.id]), trials[s.id])
            )
            for s in sweeps
        ],
        next=next_cursor,
    )


def cancel(session: Session, sweep_id: str) -> SweepRead:
    """Cancel a running sweep: its queued trials at once, its running ones within about a
    second (the jobs' cancel rule); it ends ``cancelled`` once they have. 409 once ended.

    The trials' rows are taken first, then the sweep's (the lock order of a trial's ending,
    :mod:`service.store.sweeps.repo`), and the sweep is read again under its lock: of two
    cancels at once, the second waits for the first's trials, then reads the sweep the first
    committed, and answers 409 (rolled back) where the first ended it (all its trials were
    queued); while trials still run, the sweep is running and a second cancel is a 200 again."""
    ended = f"sweep {sweep_id} has already ended"
    sweep = _sweep_or_404(session, sweep_id)
    if sweep.status != SweepStatus.RUNNING:
        raise Conflict(f"{ended} ({sweep.status}); nothing to cancel")
    now = utcnow()
    job_repo.cancel_trials(session, sweep_id, now=now)
    locked = sweep_repo.lock_sweep(session, sweep_id)
    if locked is None:  # deleted meanwhile
        raise NotFound(f"no sweep with id {sweep_id}")
    if locked.status != SweepStatus.RUNNING:
        raise Conflict(f"{ended} ({locked.status}); nothing to cancel")
    sweep_repo.request_cancel(session, locked)
    sweep_repo.settle(session, sweep_id, now)
    session.commit()
    return read(session, sweep_id)


def delete_rows(session: Session, sweep_id: str) -> list[deletion.DeletedJob]:
    """Delete an ended sweep's rows and its trials', each trial checked as ``DELETE
    /jobs/{id}`` checks a job, all at once (:func:`deletion.deletable_trials`: 409 while an
    alias names one), in one transaction, and commit; its files are left to the caller
    (:func:`deletion.remove_artifacts`, once the rows are gone). 404 unknown; 409 while it
    runs."""
    sweep = sweep_repo.lock_sweep(session, sweep_id)
    if sweep is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    if sweep.status == SweepStatus.RUNNING:
        raise Conflict(
            f"sweep {sweep_id} is running: cancel it first (POST /sweeps/{sweep_id}/cancel), "
            "then delete it once it has ended"
        )
    deleted = deletion.deletable_trials(session, sweep_id)
    job_repo.delete_trials(session, sweep_id)
    sweep_repo.delete_sweep(session, sweep_id)
    session.commit()
    log.info("sweep %s deleted with %d trials", sweep_id, len(deleted))
    return deleted


def delete(session: Session, checkpoint_dir: Path, sweep_id: str) -> list[deletion.DeletedJob]:
    """Delete an ended sweep with its trials, their metrics and artifacts: the rows
    (:func:`delete_rows`), then the files, the folder listed once for all the trials."""
    deleted = delete_rows(session, sweep_id)
    deletion.remove_artifacts(checkpoint_dir, deleted)
    return deleted
