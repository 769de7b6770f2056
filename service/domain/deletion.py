"""Deleting an ended job: its rows in one transaction, then its files.

The order is the point. The rows (the job, its steps, epochs and aliases) go in one
transaction; the files (:func:`remove_artifacts`) only after it has committed. A crash in
between leaves an orphan file that nothing names (harmless, and a later delete of the same
files finds nothing to do), never a row that names a file already gone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.errors import Conflict, NotFound
from service.status import TERMINAL
from service.store import job_repo, model_repo
from service.store.artifacts.backends import remove_jobs_files
from service.store.sweeps import repo as sweep_repo

log = logging.getLogger("service.jobs")


@dataclass(frozen=True)
class DeletedJob:
    """What is left to clean up once a job's rows are gone."""

    job_id: str
    # The weights file its row named: an API process may hold that model in its cache.
    checkpoint: str | None


def _check_ended(job: Any, sweep_id: str | None) -> None:
    """409 for a job that may not go yet (:func:`deletable`'s rules but the aliases')."""
    if job.sweep_id is not None and job.sweep_id != sweep_id:
        raise Conflict(
            f"job {job.id} is a trial of sweep {job.sweep_id}: it goes with its sweep "
            f"(DELETE /sweeps/{job.sweep_id}, once the sweep has ended)"
        )
    if job.status not in TERMINAL:
        raise Conflict(
            f"job {job.id} is {job.status}: cancel it first (POST /jobs/{job.id}/cancel), "
            "then delete it once it has ended"
        )


def _check_unaliased(job_id: str, aliases: list[str]) -> None:
    """409 naming the first alias that points at the job, if one does."""
    if aliases:
        raise Conflict(
            f"model alias {aliases[0]!r} points at job {job_id}: point it at another model "
            "or delete it first",
            details=[{"aliases": aliases}],
        )


def deletable(session: Session, job_id: str, *, sweep_id: str | None = None) -> DeletedJob:
    """Lock an ended job's row for deleting it in this transaction: 404 unknown, 409 while it
    is queued or running (cancel it first), while an alias names it (the alias is named), or
    where it is a trial of a sweep other than ``sweep_id``, the sweep being deleted: a trial
    goes only with its sweep, whose record (its trials, their counts, its best) it is part of
    (a trial deleted from a running sweep turned a succeeded grid ``failed``, its best gone).

    The check and the delete are one transaction over the locked row
    (:func:`job_repo.lock_job`): a worker cannot claim or finish the job between them (it
    has ended; a queued or running one is refused), and an alias cannot be pointed at it
    meanwhile (pointing one locks the same row, :func:`service.serving.registry.set_alias`).
    """
    job = job_repo.lock_job(session, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    _check_ended(job, sweep_id)
    _check_unaliased(job_id, model_repo.aliases_of(session, [job_id]).get(job_id, []))
    return DeletedJob(job_id=job.id, checkpoint=job.checkpoint)


def deletable_trials(session: Session, sweep_id: str) -> list[DeletedJob]:
    """:func:`deletable` for every trial of a sweep at once, in the order they were queued:
    their rows locked and their aliases read in one statement each, whatever their number
    (a lock and an alias query per trial took 24 s for 10,000), then each checked by the
    same rules in that order, so a refusal names what the checks one by one named. Every
    row is locked before the aliases are read, so an alias pointed at a trial meanwhile has
    either committed (and refuses) or waits for this transaction, as with one job."""
    trials = job_repo.lock_trials(session, sweep_id)
    aliases = sweep_repo.trial_aliases(session, sweep_id)
    for trial in trials:
        _check_ended(trial, sweep_id)
        _check_unaliased(trial.id, aliases.get(trial.id, []))
    return [DeletedJob(job_id=trial.id, checkpoint=trial.checkpoint) for trial in trials]


def delete_job(session: Session, job_id: str) -> DeletedJob:
    """Delete an ended job's rows (:func:`deletable` says when it may go) and commit."""
    deleted = deletable(session, job_id)
    job_repo.delete_job(session, job_id)
    session.commit()
    return deleted


def remove_artifacts(checkpoint_dir: Path, deleted: Iterable[DeletedJob]) -> None:
    """Remove the files of jobs whose rows are gone (their artifact rows went with them, by
    cascade): the one place a deleted job's stored artifacts go away. What its files are
    called is the artifacts store's to say (:func:`remove_jobs_files`), which lists the
    folder once for all of ``deleted``: pass a batch's jobs together, not one by one."""
    remove_jobs_files(checkpoint_dir, {job.job_id: job.checkpoint for job in deleted})


def delete_job_and_artifacts(session: Session, checkpoint_dir: Path, job_id: str) -> DeletedJob:
    """:func:`delete_job`, then (committed) :func:`remove_artifacts`: the API's delete path
    (retention runs the same two, a batch's files removed together)."""
    deleted = delete_job(session, job_id)
    remove_artifacts(checkpoint_dir, [deleted])
    log.info("job %s deleted", job_id)
    return deleted
