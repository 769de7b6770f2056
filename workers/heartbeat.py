"""The worker's heartbeat: a side thread that keeps the worker row and its jobs' leases fresh.

Flushes renew the lease while the loop trains; this thread covers the silent stretches (data
loading, evaluation, saving) and says the worker process itself is alive (``GET /workers``).
While the database is down, beats are retried with backoff (at most ``heartbeat_s`` apart).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import LeaseLost
from service.store import queue_repo, worker_repo
from service.store.outage import Backoff, Outage, is_outage
from workers.reporting import Reporter

log = logging.getLogger("workers")


class Heartbeat(threading.Thread):
    """Every ``heartbeat_s``: the worker row's heartbeat, and each job's lease if no flush did."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        worker_id: str,
        heartbeat_s: float,
        lease_s: float,
        outage: Outage | None = None,
    ) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._sessions = sessions
        self._worker_id = worker_id
        self._heartbeat_s = heartbeat_s
        self._lease_s = lease_s
        self._done = threading.Event()
        self._outage = outage or Outage(log)
        self._backoff = Backoff(cap_s=heartbeat_s)
        # The jobs being trained (one, or a pack's), set by the worker: replaced, never mutated.
        self.reporters: tuple[Reporter, ...] = ()

    def run(self) -> None:
        """Beat until stopped; a beat the database refused is retried with backoff."""
        delay = self._heartbeat_s
        while not self._done.wait(delay):
            delay = self._heartbeat_s
            try:
                self.beat()
            except Exception as exc:
                if is_outage(exc):
                    self._outage.failed(exc, "heartbeat")
                    delay = self._backoff.next_delay()
                    continue
                # Not the database's absence: a bug to see, but the beats go on (leases have slack).
                log.warning("heartbeat failed; retrying in %.1f s", delay, exc_info=True)
                continue
            self._outage.ok()
            self._backoff.reset()

    def beat(self) -> None:
        """One heartbeat."""
        with self._sessions.begin() as session:
            worker_repo.worker_heartbeat(session, worker_id=self._worker_id)
        for reporter in self.reporters:
            if time.monotonic() - reporter.last_renewal >= self._heartbeat_s:
                self._renew(reporter)

    def _renew(self, reporter: Reporter) -> None:
        """Extend one job's lease, in a transaction of its own: a pack's other jobs keep
        theirs whatever happened to this one."""
        claim = reporter.claim
        try:
            with self._sessions.begin() as session:
                queue_repo.heartbeat(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    lease_s=self._lease_s,
                    now=utcnow(),
                )
            reporter.last_renewal = time.monotonic()
        except LeaseLost:
            pass  # the reporter's next flush finds out too, and stops the job

    def stop(self) -> None:
        """Stop beating and wait for the thread."""
        self._done.set()
        self.join()
