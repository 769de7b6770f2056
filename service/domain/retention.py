"""Retention (``MNIST_RETENTION_DAYS``): ended jobs and sweeps that finished longer ago are
deleted.

Who runs it: each API process, in a daemon thread of its own (never on the event loop), which
looks every :data:`CHECK_EVERY_S`; but only the one that claims the period in the database
(:func:`periods.claim_period`, a conditional update) does the work, so it runs once
per :data:`PERIOD` across every API process and machine, on PostgreSQL and SQLite alike. The
API rather than the workers: a worker's job is training, an idle one may never be idle on a
busy cluster, and there is always an API. Jobs go by the one delete path
(:func:`deletion.delete_job`), each in its own transaction, listed in batches, the files of a
batch's removed together once their rows are gone (:func:`deletion.remove_artifacts`):
a job an alias names is kept, and one aliased between the listing and its delete is refused
by that delete's own check and kept too. A sweep's trials are never deleted alone (a running
sweep would lose trials from its record): an ended sweep goes whole, in one transaction, by
``DELETE /sweeps/{id}``'s path (:func:`service.domain.sweeps.delete_rows`), once it finished
before the cutoff, and is kept while an alias names one of its trials (its promoted best,
usually); its files go with its batch's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain import sweeps
from service.domain.deletion import DeletedJob, delete_job, remove_artifacts
from service.errors import Conflict, NotFound
from service.store import availability, job_repo
from service.store.outage import is_outage
from service.store.sweeps import repo as sweep_repo
from service.store.upkeep import periods

log = logging.getLogger("service.retention")

CHORE = "retention"
PERIOD = timedelta(hours=1)  # retention is counted in days: an hour late is on time
CHECK_EVERY_S = 60.0
BATCH = 100


class Retention:
    """One retention pass over the database, at the time ``clock`` says."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        checkpoint_dir: Path,
        days: int,
        *,
        clock: Callable[[], datetime] = utcnow,
        period: timedelta = PERIOD,
        batch: int = BATCH,
    ) -> None:
        self._sessions = sessions
        self._checkpoint_dir = checkpoint_dir
        self._keep = timedelta(days=days)
        self._clock = clock
        self._period = period
        self._batch = batch

    def run_once(self) -> int | None:
        """Delete the expired jobs and sweeps if no process has within the period: how many
        went (a sweep counts one, whatever its trials), or None when another pass (this
        process's or another's) ran less than a period ago."""
        now = self._clock()
        with self._sessions() as session:
            claimed = periods.claim_period(session, CHORE, now=now, period=self._period)
            session.commit()
        if not claimed:
            return None
        cutoff = now - self._keep
        jobs = self._expire(cutoff, job_repo.ended_before, self._delete)
        swept = self._expire(cutoff, sweep_repo.ended_before, self._delete_sweep)
        if jobs or swept:
            log.info(
                "retention: deleted %d jobs and %d sweeps that ended before %s",
                jobs,
                swept,
                cutoff,
            )
        return jobs + swept

    def _expire(
        self,
        cutoff: datetime,
        listed: Callable[..., list[str]],
        delete: Callable[[Session, str], list[DeletedJob]],
    ) -> int:
        """Delete what ``listed`` lists as ended before ``cutoff``, batch after batch: each
        item's rows in a transaction of its own (``delete``), then the files of the batch's,
        the folder listed once for them all (once per job made a pass cost the jobs times
        the folder's files); those of the rows already gone even when a later item fails."""
        deleted = 0
        while True:
            with self._sessions() as session:
                batch = listed(session, cutoff, limit=self._batch)
            gone = 0
            files: list[DeletedJob] = []
            try:
                for item in batch:
                    with self._sessions() as session:
                        try:
                            files.extend(delete(session, item))
                        except (NotFound, Conflict):  # deleted or aliased since listed: kept
                            continue
                    gone += 1
            finally:
                remove_artifacts(self._checkpoint_dir, files)
            deleted += gone
            # A short batch was the last; a batch of refusals only (aliased since) is left.
            if len(batch) < self._batch or gone == 0:
                return deleted

    @staticmethod
    def _delete(session: Session, job_id: str) -> list[DeletedJob]:
        deleted = delete_job(session, job_id)
        log.info("job %s deleted", job_id)
        return [deleted]

    @staticmethod
    def _delete_sweep(session: Session, sweep_id: str) -> list[DeletedJob]:
        return sweeps.delete_rows(session, sweep_id)


class RetentionThread:
    """Runs :meth:`Retention.run_once` at start and every ``every_s`` seconds, in a daemon
    thread, until :meth:`stop`. A database outage is logged once (the API's outage log) and
    tried again next time; any other error is logged and tried again next time too."""

    def __init__(self, retention: Retention, every_s: float = CHECK_EVERY_S) -> None:
        self._retention = retention
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self.passes = 0  # passes attempted, for tests

    def start(self) -> None:
        """Start looking."""
        self._thread.start()

    def stop(self) -> None:
        """Stop, waiting for a pass under way (a few transactions) to end."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._retention.run_once()
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    log.exception("retention failed; trying again in %g s", self._every_s)
                else:
                    availability.API_OUTAGE.failed(exc, "retention")
            except Exception:
                log.exception("retention failed; trying again in %g s", self._every_s)
            self.passes += 1
            self._stop.wait(self._every_s)
