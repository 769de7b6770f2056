"""How a claimed job ends: one mapping from the way its training stopped to the job's row.

The same for a job trained alone (:meth:`workers.worker.Worker.run_job`) and for each job of a
pack (:mod:`workers.packed`), where every job ends on its own while the others train on: a
job's ending never depends on the path that trained it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import CancelRequested, LeaseLost
from service.ml import SimpleMLP, to_host
from service.status import JobStatus
from service.store import queue_repo
from service.store.artifacts.backends import Artifacts, Saved
from service.store.outage import is_outage
from workers.data import DataUnavailable
from workers.reporting import (
    Claim,
    Diverged,
    Reporter,
    RuntimeLimitExceeded,
    Shutdown,
    StorageFailed,
)

log = logging.getLogger("workers")

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """How one claimed job ended, as far as this worker knows."""

    job_id: str
    # "handed back": for a fault of this worker's host (its storage), not of the job.
    status: JobStatus | Literal["released", "handed back", "lost"]
    flush_seconds: float = 0.0


class Retry(Protocol):
    """The worker's retry through a database outage (:meth:`workers.worker.Worker._retry`)."""

    def __call__(self, op: Callable[[], T], what: str, *, within_s: float | None = None) -> T:
        """``op()``, retried while the database is down (``within_s``: once stopping)."""
        ...


def raises(exc: BaseException) -> Callable[[], SimpleMLP]:
    """A training that already ended with ``exc`` (a pack's job), for :meth:`Endings.conclude`."""

    def ended() -> SimpleMLP:
        raise exc

    return ended


def returns(model: SimpleMLP) -> Callable[[], SimpleMLP]:
    """A training that already ended with ``model`` (a pack's job)."""
    return lambda: model


class Endings:
    """Records the end of a claimed job: finished, released or handed back, all fenced."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        artifacts: Artifacts,
        retry: Retry,
        *,
        shutdown_grace_s: float,
    ) -> None:
        self._sessions = sessions
        self._artifacts = artifacts
        self._retry = retry
        self._shutdown_grace_s = shutdown_grace_s

    def conclude(self, claim: Claim, reporter: Reporter, train: Callable[[], SimpleMLP]) -> Outcome:
        """Run ``train`` (or take what it already gave) and record how the job ended: its
        checkpoint and ``succeeded``, or what its exception means. Never raises for the job's
        own faults."""
        job_id, attempt = claim.job_id, claim.attempt
        try:
            model = train()
            weights = to_host(model.state_dict())  # the job's own: a fault here is not the disk's
            try:
                saved = self._artifacts.save(weights, job_id=job_id, attempt=attempt)
            except (OSError, RuntimeError) as exc:  # torch reports a failed write as either
                raise StorageFailed("could not write the checkpoint") from exc
            reporter.drain()  # every step is stored before the job says it succeeded
            return self.finish(claim, JobStatus.SUCCEEDED, reporter, checkpoint=saved)
        except CancelRequested:
            return self.finish(claim, JobStatus.CANCELLED, reporter)
        except LeaseLost:
            log.warning("job %s attempt %d: lease lost, stopping", job_id, attempt)
            return Outcome(job_id, "lost", reporter.flush_seconds)
        except Shutdown as exc:
            log.info("job %s: %s", job_id, exc)
            return self.release(claim, reporter)
        except (StorageFailed, DataUnavailable) as exc:
            # The detail (the path, the errno) is the operator's; clients read the message.
            log.error("job %s: %s", job_id, exc, exc_info=exc.__cause__)
            return self.hand_back(claim, str(exc), reporter)
        except (Diverged, RuntimeLimitExceeded, ValueError) as exc:
            return self.finish(claim, JobStatus.FAILED, reporter, error=str(exc))
        except Exception as exc:
            if is_outage(exc):  # not retried where it came from: the lease brings the job back
                log.exception(
                    "job %s: the database failed it; it returns when the lease ends", job_id
                )
                return Outcome(job_id, "lost", reporter.flush_seconds)
            log.exception("job %s failed", job_id)
            # A library's message may hold a path or advice meant for the operator: not shown.
            error = f"the worker failed ({type(exc).__name__}); its log has the details"
            return self.finish(claim, JobStatus.FAILED, reporter, error=error)

    def finish(
        self,
        claim: Claim,
        status: JobStatus,
        reporter: Reporter,
        *,
        error: str | None = None,
        checkpoint: Saved | None = None,
    ) -> Outcome:
        """Move the job to ``status`` (its checkpoint named), and drop its training states."""

        def finish() -> JobStatus:
            with self._sessions.begin() as session:
                return queue_repo.finish_job(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    status=status,
                    now=utcnow(),
                    error=error,
                    checkpoint=None if checkpoint is None else checkpoint.ref,
                    checkpoint_blob=None if checkpoint is None else checkpoint.blob,
                    unsynced=reporter.unsynced_steps,
                )

        try:
            status = self._retry(finish, "finish the job")  # a late cancel wins a success
        except LeaseLost:
            log.warning("job %s attempt %d: lease lost before the end", claim.job_id, claim.attempt)
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        self._artifacts.keep_resume(claim.job_id, keep=())
        log.info(
            "job %s %s%s%s",
            claim.job_id,
            status,
            f": {error}" if error else "",
            reporter.trained_at,
        )
        return Outcome(claim.job_id, status, reporter.flush_seconds)

    def release(self, claim: Claim, reporter: Reporter) -> Outcome:
        """Give the job back to the queue, its attempt not counted (the worker is stopping)."""

        def release() -> None:
            with self._sessions.begin() as session:
                queue_repo.release_job(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    now=utcnow(),
                )

        try:
            self._retry(release, "release the job", within_s=self._shutdown_grace_s)
        except LeaseLost:
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("job %s: the database is down; its lease brings it back", claim.job_id)
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        log.info("job %s released back to the queue", claim.job_id)
        return Outcome(claim.job_id, "released", reporter.flush_seconds)

    def hand_back(self, claim: Claim, reason: str, reporter: Reporter) -> Outcome:
        """The job goes on as its next attempt, at first not counted against its attempts
        (the fault is this host's: :func:`queue_repo.hand_back`), or ends cancelled when a
        cancel was asked meanwhile, or failed once the faults have spent its attempts."""

        def hand_back() -> JobStatus | None:
            with self._sessions.begin() as session:
                return queue_repo.hand_back(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    now=utcnow(),
                    reason=reason,
                )

        try:
            ended = self._retry(hand_back, "hand the job back")
        except LeaseLost:
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        if ended is not None:
            self._artifacts.keep_resume(claim.job_id, keep=())
            log.info("job %s %s: %s", claim.job_id, ended.value, reason)
            return Outcome(claim.job_id, ended, reporter.flush_seconds)
        log.info("job %s handed back for its next attempt: %s", claim.job_id, reason)
        return Outcome(claim.job_id, "handed back", reporter.flush_seconds)
