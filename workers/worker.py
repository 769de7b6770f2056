"""The worker: claim → train → report, one job at a time, until asked to stop.

Every call to the database rides out an outage (:mod:`service.store.outage`): the worker
retries with backoff for as long as it lasts, and one :class:`Outage`, shared with the
heartbeat and the reporter, logs when it starts and when it ends.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain.jobs import params_of
from service.errors import CancelRequested, LeaseLost
from service.logs import log_context
from service.ml import resolve_device, to_host
from service.settings import Settings
from service.status import JobStatus
from service.store import queue_repo, wakeups, worker_repo
from service.store.artifacts.backends import ArtifactSource, Saved, Source, artifacts_for
from service.store.outage import Outage, is_outage, retry
from service.store.tables import Job
from workers.data import load_mnist, preload_mnist
from workers.heartbeat import Heartbeat
from workers.host import new_worker_id, pid_alive
from workers.reporting import (
    Claim,
    Diverged,
    Limits,
    Reporter,
    RuntimeLimitExceeded,
    Shutdown,
    StorageFailed,
)
from workers.threads import ThreadTuner, process_tuner
from workers.training.graphs import graph_backend
from workers.training.train import train

log = logging.getLogger("workers")

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """How one claimed job ended, as far as this worker knows."""

    job_id: str
    status: JobStatus | Literal["released", "lost"]
    flush_seconds: float = 0.0


class Worker:
    """Claims jobs from the database and trains them on one device."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        stop: threading.Event | None = None,
        show_progress: bool = True,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        wakeups.attach(sessions, settings.database_url, enabled=settings.wakeups)
        self.stop = stop or threading.Event()
        self.show_progress = show_progress
        self.host = socket.gethostname()
        self.worker_id = new_worker_id()
        self.artifacts = artifacts_for(settings)  # where this worker writes
        self.source = ArtifactSource(settings.checkpoint_dir, sessions)  # what rows name
        self.device = resolve_device(settings.device)
        # On a CPU, "auto" lets the process's tuner pick the thread count step by step.
        self.threads: ThreadTuner | None = None
        if self.device.type == "cpu" and settings.torch_threads == "auto":
            self.threads = process_tuner()
        elif self.device.type == "cpu" and isinstance(settings.torch_threads, int):
            torch.set_num_threads(settings.torch_threads)
        self.outage = Outage(log)
        self.heartbeat = Heartbeat(
            sessions,
            worker_id=self.worker_id,
            heartbeat_s=settings.heartbeat_s,
            lease_s=settings.lease_s,
            outage=self.outage,
        )

    def _retry(self, op: Callable[[], T], what: str, *, within_s: float | None = None) -> T:
        """``op()``, retried through a database outage; for at most ``within_s`` once the
        worker is asked to stop (None: until the database is back)."""
        give_up = None if within_s is None else self._stopping_for(within_s)
        return retry(op, outage=self.outage, what=what, wait=self._pause, give_up=give_up)

    def _pause(self, seconds: float) -> None:
        """Wait between retries: cut short by a stop request, a plain sleep once stopping
        (``stop.wait`` would return at once and make the retries a busy loop)."""
        if self.stop.is_set():
            time.sleep(seconds)
        else:
            self.stop.wait(seconds)

    def _stopping_for(self, seconds: float) -> Callable[[], bool]:
        """Whether :attr:`stop` has been set for ``seconds`` (counted from the first ask)."""
        since: list[float] = []

        def past() -> bool:
            if not self.stop.is_set():
                return False
            since[:] = since or [time.monotonic()]
            return time.monotonic() - since[0] >= seconds

        return past

    def run(self, *, max_jobs: int | None = None) -> None:
        """Serve the queue until :attr:`stop` is set (or ``max_jobs`` jobs are done)."""
        with log_context(worker_id=self.worker_id):
            try:
                self._retry(self.register, "register", within_s=0)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.info("worker %s stopped before the database was back", self.worker_id)
                return
            self.heartbeat.start()
            preload_mnist(
                self.settings.data_dir, device=self.device, download=self.settings.download
            )
            log.info("worker %s ready on %s", self.worker_id, self.device)
            try:
                self._serve(max_jobs)
            finally:
                self.heartbeat.stop()
                self._stopped()

    def _serve(self, max_jobs: int | None) -> None:
        """Claim again as soon as a job ends; idle, until a job is queued (a wake-up) or for
        ``poll_interval_s`` (the wake-up was lost, or wake-ups are off)."""
        done, s = 0, self.settings
        with wakeups.waiting(s.database_url, wakeups.JOB_QUEUED, enabled=s.wakeups) as queued:
            while not self.stop.is_set() and (max_jobs is None or done < max_jobs):
                try:
                    job = self._retry(self.claim, "claim", within_s=0)
                except Exception as exc:
                    if is_outage(exc) and self.stop.is_set():
                        return  # asked to stop while the database is down: nothing is held
                    raise
                if job is None:
                    queued.wait(s.poll_interval_s, self.stop)
                    continue
                with log_context(job_id=job.id, attempt=job.attempt):
                    self.run_job(job)
                done += 1

    def _stopped(self) -> None:
        """Record that this worker stopped; past the grace, a restart on this host (or the
        API's one-lease liveness rule) says it instead."""

        def stopped() -> None:
            with self.sessions.begin() as session:
                worker_repo.worker_stopped(session, worker_id=self.worker_id, now=utcnow())

        try:
            self._retry(stopped, "worker stopped", within_s=self.settings.shutdown_grace_s)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("worker %s stopped; the database did not hear of it", self.worker_id)
            return
        log.info("worker %s stopped", self.worker_id)

    def register(self) -> None:
        """Record this worker, and recover the jobs of workers on this host that died."""
        now = utcnow()
        with self.sessions.begin() as session:
            for row in worker_repo.workers_on_host(session, self.host):
                if not pid_alive(row.pid) or row.pid == os.getpid():
                    jobs = worker_repo.recover_dead_worker(session, worker_id=row.id, now=now)
                    log.info("worker %s is gone; %d of its jobs are claimable again", row.id, jobs)
            worker_repo.register_worker(
                session,
                worker_id=self.worker_id,
                host=self.host,
                pid=os.getpid(),
                device=str(self.device),
                now=now,
            )

    def claim(self) -> Job | None:
        """Take the oldest claimable job, or None."""
        with self.sessions.begin() as session:
            job = queue_repo.claim_job(
                session,
                worker_id=self.worker_id,
                lease_s=self.settings.lease_s,
                device=str(self.device),
                now=utcnow(),
            )
        if job is not None:
            log.info("claimed job %s attempt %d", job.id, job.attempt)
        return job

    def run_job(self, job: Job) -> Outcome:
        """Train a claimed job and record how it ended; never raises for the job's own faults."""
        claim = Claim(job.id, job.attempt, self.worker_id)
        params = params_of(job)
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        max_runtime_s = job.max_runtime_s or self.settings.max_runtime_s
        reporter = Reporter(
            claim=claim,
            params=params,
            sessions=self.sessions,
            limits=Limits(
                lease_s=self.settings.lease_s,
                flush_interval_s=self.settings.flush_interval_s,
                max_runtime_s=max_runtime_s,
                shutdown_grace_s=self.settings.shutdown_grace_s,
            ),
            stop=self.stop,
            checkpoint_dir=self.settings.checkpoint_dir,
            artifacts=self.artifacts,
            show_progress=self.show_progress,
            threads=self.threads,
            outage=self.outage,
            max_buffered_steps=self.settings.outage_buffer_steps,
        )
        self.heartbeat.reporter = reporter
        try:
            resume_from = self._resume_point(job, claim, reporter)
            log.info(
                "job %s attempt %d: training %s on %s%s",
                job.id,
                job.attempt,
                params,
                self.device,
                f", resuming after epoch {job.resume_epoch}" if resume_from else "",
            )
            data = load_mnist(
                self.settings.data_dir, device=self.device, download=self.settings.download
            )
            graphs = graph_backend(self.device, self.settings.cuda_graphs)
            model = train(params, data, self.device, seed, reporter, resume_from, graphs)
            try:
                weights = to_host(model.state_dict())
                saved = self.artifacts.save(weights, job_id=job.id, attempt=job.attempt)
            except (OSError, RuntimeError) as exc:  # torch reports a failed write as either
                raise StorageFailed("could not write the checkpoint") from exc
            reporter.drain()  # every step is stored before the job says it succeeded
            return self._finish(claim, JobStatus.SUCCEEDED, reporter, checkpoint=saved)
        except CancelRequested:
            return self._finish(claim, JobStatus.CANCELLED, reporter)
        except LeaseLost:
            log.warning("job %s attempt %d: lease lost, stopping", job.id, job.attempt)
            return Outcome(job.id, "lost", reporter.flush_seconds)
        except Shutdown as exc:
            log.info("job %s: %s", job.id, exc)
            return self._release(claim, reporter)
        except StorageFailed as exc:
            # The detail (the path, the errno) is the operator's; clients read the message.
            log.error("job %s: %s", job.id, exc, exc_info=exc.__cause__)
            return self._hand_back(claim, str(exc), reporter)
        except (Diverged, RuntimeLimitExceeded, ValueError) as exc:
            return self._finish(claim, JobStatus.FAILED, reporter, error=str(exc))
        except Exception as exc:
            if is_outage(exc):  # not retried where it came from: the lease brings the job back
                log.exception(
                    "job %s: the database failed it; it returns when the lease ends", job.id
                )
                return Outcome(job.id, "lost", reporter.flush_seconds)
            log.exception("job %s failed", job.id)
            # A library's message may hold a path or advice meant for the operator: not shown.
            error = f"the worker failed ({type(exc).__name__}); its log has the details"
            return self._finish(claim, JobStatus.FAILED, reporter, error=error)
        finally:
            self.heartbeat.reporter = None
            reporter.close()

    def _resume_point(self, job: Job, claim: Claim, reporter: Reporter) -> Source | None:
        """The saved state a retried job continues from (whichever worker saved it, when it
        is in the database); None to start at epoch 1."""
        ref = job.resume_checkpoint
        if job.resume_epoch == 0 or ref is None:
            return None
        source = self._retry(lambda: self.source.open(ref), "read the training state")
        if source is not None:
            reporter.resume_at(job.resume_epoch, job.accuracy)
            return source
        log.warning("job %s: %s is missing, starting over", job.id, self.source.where(ref))

        def forget() -> None:
            with self.sessions.begin() as session:
                queue_repo.forget_resume_point(
                    session, job_id=claim.job_id, attempt=claim.attempt, worker_id=claim.worker_id
                )

        self._retry(forget, "forget the resume point")
        return None

    def _finish(
        self,
        claim: Claim,
        status: JobStatus,
        reporter: Reporter,
        *,
        error: str | None = None,
        checkpoint: Saved | None = None,
    ) -> Outcome:

        def finish() -> None:
            with self.sessions.begin() as session:
                queue_repo.finish_job(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    status=status,
                    now=utcnow(),
                    error=error,
                    checkpoint=None if checkpoint is None else checkpoint.ref,
                    checkpoint_blob=None if checkpoint is None else checkpoint.blob,
                )

        try:
            self._retry(finish, "finish the job")
        except LeaseLost:
            log.warning("job %s attempt %d: lease lost before the end", claim.job_id, claim.attempt)
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        self.artifacts.keep_resume(claim.job_id, keep=())
        log.info("job %s %s%s", claim.job_id, status, f": {error}" if error else "")
        return Outcome(claim.job_id, status, reporter.flush_seconds)

    def _release(self, claim: Claim, reporter: Reporter) -> Outcome:
        def release() -> None:
            with self.sessions.begin() as session:
                queue_repo.release_job(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    now=utcnow(),
                )

        try:
            self._retry(release, "release the job", within_s=self.settings.shutdown_grace_s)
        except LeaseLost:
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("job %s: the database is down; its lease brings it back", claim.job_id)
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        log.info("job %s released back to the queue", claim.job_id)
        return Outcome(claim.job_id, "released", reporter.flush_seconds)

    def _hand_back(self, claim: Claim, reason: str, reporter: Reporter) -> Outcome:
        """The job goes on as its next attempt (or fails, past the last), as a lost worker's."""

        def hand_back() -> bool:
            with self.sessions.begin() as session:
                return queue_repo.hand_back(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    now=utcnow(),
                    reason=reason,
                )

        try:
            again = self._retry(hand_back, "hand the job back")
        except LeaseLost:
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        if not again:
            self.artifacts.keep_resume(claim.job_id, keep=())
            log.info("job %s failed: %s on its last attempt", claim.job_id, reason)
            return Outcome(claim.job_id, JobStatus.FAILED, reporter.flush_seconds)
        log.info("job %s handed back for its next attempt: %s", claim.job_id, reason)
        return Outcome(claim.job_id, "released", reporter.flush_seconds)
