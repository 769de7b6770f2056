"""The worker: claim → train → report, one job at a time, until asked to stop."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain.jobs import params_of
from service.errors import CancelRequested, LeaseLost
from service.logs import log_context
from service.ml import checkpoint_path, resolve_device, save_checkpoint
from service.settings import Settings
from service.status import JobStatus
from service.store import queue_repo, worker_repo
from service.store.tables import Job
from workers.data import load_mnist
from workers.graphs import graph_backend
from workers.heartbeat import Heartbeat
from workers.reporting import (
    Claim,
    Diverged,
    Limits,
    Reporter,
    RuntimeLimitExceeded,
    Shutdown,
)
from workers.resume import remove_resume_files
from workers.threads import ThreadTuner, process_tuner
from workers.train import train

log = logging.getLogger("workers")

ERROR_MAX_CHARS = 2000


def new_worker_id() -> str:
    """host:pid:random, unique per worker process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self.stop = stop or threading.Event()
        self.show_progress = show_progress
        self.host = socket.gethostname()
        self.worker_id = new_worker_id()
        self.device = resolve_device(settings.device)
        # On a CPU, "auto" lets the process's tuner pick the thread count step by step.
        self.threads: ThreadTuner | None = None
        if self.device.type == "cpu" and settings.torch_threads == "auto":
            self.threads = process_tuner()
        elif self.device.type == "cpu" and isinstance(settings.torch_threads, int):
            torch.set_num_threads(settings.torch_threads)
        self.heartbeat = Heartbeat(
            sessions,
            worker_id=self.worker_id,
            heartbeat_s=settings.heartbeat_s,
            lease_s=settings.lease_s,
        )

    def run(self, *, max_jobs: int | None = None) -> None:
        """Serve the queue until :attr:`stop` is set (or ``max_jobs`` jobs are done)."""
        self.register()
        self.heartbeat.start()
        with log_context(worker_id=self.worker_id):
            log.info("worker %s ready on %s", self.worker_id, self.device)
            done = 0
            try:
                while not self.stop.is_set() and (max_jobs is None or done < max_jobs):
                    job = self.claim()
                    if job is None:
                        self.stop.wait(self.settings.poll_interval_s)
                        continue
                    with log_context(job_id=job.id, attempt=job.attempt):
                        self.run_job(job)
                    done += 1
            finally:
                self.heartbeat.stop()
                with self.sessions.begin() as session:
                    worker_repo.worker_stopped(session, worker_id=self.worker_id, now=utcnow())
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
            show_progress=self.show_progress,
            threads=self.threads,
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
            path = checkpoint_path(self.settings.checkpoint_dir, f"{job.id}-{job.attempt}")
            save_checkpoint(model, path)
            return self._finish(claim, JobStatus.SUCCEEDED, reporter, checkpoint=path.name)
        except CancelRequested:
            return self._finish(claim, JobStatus.CANCELLED, reporter)
        except LeaseLost:
            log.warning("job %s attempt %d: lease lost, stopping", job.id, job.attempt)
            return Outcome(job.id, "lost", reporter.flush_seconds)
        except Shutdown as exc:
            log.info("job %s: %s", job.id, exc)
            return self._release(claim, reporter)
        except (Diverged, RuntimeLimitExceeded, ValueError) as exc:
            return self._finish(claim, JobStatus.FAILED, reporter, error=str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            error = f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS]
            return self._finish(claim, JobStatus.FAILED, reporter, error=error)
        finally:
            self.heartbeat.reporter = None
            reporter.close()

    def _resume_point(self, job: Job, claim: Claim, reporter: Reporter) -> Path | None:
        """The saved state a retried job continues from; None to start at epoch 1."""
        if job.resume_epoch == 0 or job.resume_checkpoint is None:
            return None
        path = self.settings.checkpoint_dir / Path(job.resume_checkpoint).name
        if path.is_file():
            reporter.resume_at(job.resume_epoch, job.accuracy)
            return path
        log.warning("job %s: %s is missing, starting over", job.id, path)
        with self.sessions.begin() as session:
            queue_repo.forget_resume_point(
                session, job_id=claim.job_id, attempt=claim.attempt, worker_id=claim.worker_id
            )
        return None

    def _finish(
        self,
        claim: Claim,
        status: JobStatus,
        reporter: Reporter,
        *,
        error: str | None = None,
        checkpoint: str | None = None,
    ) -> Outcome:
        try:
            with self.sessions.begin() as session:
                queue_repo.finish_job(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    status=status,
                    now=utcnow(),
                    error=error,
                    checkpoint=checkpoint,
                )
        except LeaseLost:
            log.warning("job %s attempt %d: lease lost before the end", claim.job_id, claim.attempt)
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        remove_resume_files(self.settings.checkpoint_dir, claim.job_id)
        log.info("job %s %s%s", claim.job_id, status, f": {error}" if error else "")
        return Outcome(claim.job_id, status, reporter.flush_seconds)

    def _release(self, claim: Claim, reporter: Reporter) -> Outcome:
        try:
            with self.sessions.begin() as session:
                queue_repo.release_job(
                    session,
                    job_id=claim.job_id,
                    attempt=claim.attempt,
                    worker_id=claim.worker_id,
                    now=utcnow(),
                )
        except LeaseLost:
            return Outcome(claim.job_id, "lost", reporter.flush_seconds)
        log.info("job %s released back to the queue", claim.job_id)
        return Outcome(claim.job_id, "released", reporter.flush_seconds)
