"""The worker: claim → train → report, one job (or one pack of jobs) at a time, until stopped.

Every call to the database rides out an outage (:mod:`service.store.outage`): the worker
retries with backoff for as long as it lasts, and one :class:`Outage`, shared with the
heartbeat and the reporter, logs when it starts and when it ends.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.backoff import capped_exponential
from service.clock import utcnow
from service.domain.jobs import params_of
from service.logs import log_context
from service.ml import SimpleMLP, resolve_device
from service.schemas import JobCreate
from service.settings import Settings
from service.store import queue_repo, wakeups, worker_repo
from service.store.artifacts.backends import ArtifactSource, artifacts_for
from service.store.outage import Outage, is_outage, retry
from service.store.packs import claim_more
from service.store.tables import Job
from workers.data import Mnist, load_mnist, preload_mnist
from workers.endings import Endings, Outcome
from workers.heartbeat import Heartbeat
from workers.host import new_worker_id, pid_alive, pid_space
from workers.packed import packs_on, run_pack
from workers.reporting import Claim, Limits, Reporter
from workers.reporting.writers import Writers
from workers.resume import SavedState, UnusableState, usable_state
from workers.training.graphs import graph_backend
from workers.training.packing import PACK_FIELDS
from workers.training.train import train
from workers.tuning.threads import ThreadTuner, process_tuner

__all__ = ["Outcome", "Worker"]

log = logging.getLogger("workers")

T = TypeVar("T")
HOST_FAULT_FIRST_S = 2.0  # the pause after a job handed back for this host's fault, doubling
HOST_FAULT_MAX_S = 60.0  # ... up to this while the faults go on


def log_claims(jobs: list[Job]) -> None:
    """Log each job just claimed (the claim has committed); a first attempt with how long it
    waited since it was created, the operator's figure of claim latency (docs/benchmarks.md
    times it so), by the API's clock against this worker's (across machines, their offset)."""
    pack = f" (a pack of {len(jobs)})" if len(jobs) > 1 else ""
    now = utcnow()
    for job in jobs:
        if job.attempt == 1:
            waited_ms = (now - job.created_at).total_seconds() * 1000
            log.info(
                "claimed job %s attempt 1%s, %.1f ms after it was created", job.id, pack, waited_ms
            )
        else:
            log.info("claimed job %s attempt %d%s", job.id, job.attempt, pack)


class Worker:
    """Claims jobs from the database and trains them on one device."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        stop: wakeups.StopEvent | None = None,
        show_progress: bool = True,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        wakeups.attach(sessions, settings.database_url, enabled=settings.wakeups)
        self.stop = stop or wakeups.StopEvent()
        self.show_progress = show_progress
        self.host = socket.gethostname()
        self.pid_space = pid_space()
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
        self._leases_settled_at = -float("inf")  # time.monotonic() of this worker's last settle
        self._host_faults, self._pause_due = 0, False  # hand-backs in a row; pause once after
        # Every job's writing threads (a reporter waits for its own); shut down as run() ends.
        self.writers = Writers()
        self.endings = Endings(
            sessions, self.artifacts, self._retry, shutdown_grace_s=settings.shutdown_grace_s
        )
        # Packing needs a device with Adam's fused kernel (a CPU, a CUDA card).
        self.pack_max = settings.pack_max if packs_on(self.device) else 1
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
            # What is loaded by now (torch, the data, SQLAlchemy) lives as long as the process:
            # left to the collector, a full collection walks it all, a ~300 ms pause in one
            # job of five or so (measured in a warm worker, docs/benchmarks.md).
            gc.freeze()
            log.info("worker %s ready on %s", self.worker_id, self.device)
            try:
                self._serve(max_jobs)
            finally:
                self.heartbeat.stop()
                self.writers.shutdown()
                self._stopped()

    def _serve(self, max_jobs: int | None) -> None:
        """Claim again as soon as a job ends; idle, until a job is queued (a wake-up) or for
        ``poll_interval_s`` (the wake-up was lost, or wake-ups are off)."""
        done, s = 0, self.settings
        with wakeups.waiting(s.database_url, wakeups.JOB_QUEUED, enabled=s.wakeups) as queued:
            while not self.stop.is_set() and (max_jobs is None or done < max_jobs):
                if self._waited_out_host_faults():
                    break  # asked to stop meanwhile
                size = self.pack_max if max_jobs is None else min(self.pack_max, max_jobs - done)
                try:
                    jobs = self._retry(functools.partial(self._claim, size), "claim", within_s=0)
                except Exception as exc:
                    if is_outage(exc) and self.stop.is_set():
                        return  # asked to stop while the database is down: nothing is held
                    raise
                if not jobs:
                    queued.wait(s.poll_interval_s, self.stop)
                    continue
                if len(jobs) > 1:
                    outcomes = run_pack(self, jobs)
                else:
                    with log_context(job_id=jobs[0].id, attempt=jobs[0].attempt):
                        outcomes = [self.run_job(jobs[0])]
                done += len(jobs)
                self._pause_due = any(o.status == "handed back" for o in outcomes)
                self._host_faults = self._host_faults + 1 if self._pause_due else 0

    def _waited_out_host_faults(self) -> bool:
        """After jobs handed back for faults of this host (its storage), wait once before the
        next claim, longer at each in a row, so that other workers take the job rather than
        this host straight back; not again while idle (it paused and logged before every look
        at the queue, for good, its host fine again). Whether a stop came meanwhile."""
        if self._pause_due:
            self._pause_due = False
            pause = capped_exponential(HOST_FAULT_FIRST_S, HOST_FAULT_MAX_S, self._host_faults - 1)
            log.warning("pausing %.0f s before the next claim: this host's fault", pause)
            self._pause(pause)
        return self.stop.is_set()

    def _claim(self, size: int) -> list[Job]:
        """Up to ``size`` jobs: with packing off, today's one-job claim, exactly."""
        if size > 1:
            return self.claim_pack(size)
        job = self.claim()
        return [] if job is None else [job]

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
        """Record this worker, and recover the jobs of workers of its pid space that died."""
        now = utcnow()
        with self.sessions.begin() as session:
            for row in worker_repo.workers_in_pid_space(session, self.pid_space):
                if not pid_alive(row.pid) or row.pid == os.getpid():
                    jobs = worker_repo.recover_dead_worker(session, worker_id=row.id, now=now)
                    log.info("worker %s is gone; %d of its jobs are claimable again", row.id, jobs)
            worker_repo.register_worker(
                session,
                worker_id=self.worker_id,
                host=self.host,
                pid_space=self.pid_space,
                pid=os.getpid(),
                device=str(self.device),
                now=now,
            )

    def _settles(self) -> bool:
        """Whether the next claim settles the leases that ran out (``claim_job(settle_leases=)``):
        at most once per poll interval, the rate at which an idle worker looks anyway (a claim
        takes an expired job either way; those that can no longer run end at an idle worker's
        next look, or a busy one's first claim past the interval). Settling in every claim was a
        third of a claim's time on PostgreSQL (0.8 of 2.4 ms), paid again by every job a user
        waits for. (A claim that fails in an outage still counts.)"""
        now = time.monotonic()
        if now - self._leases_settled_at < self.settings.poll_interval_s:
            return False
        self._leases_settled_at = now
        return True

    def claim(self) -> Job | None:
        """Take the oldest claimable job, or None."""
        settle = self._settles()
        with self.sessions.begin() as session:
            job = queue_repo.claim_job(
                session,
                worker_id=self.worker_id,
                lease_s=self.settings.lease_s,
                device=str(self.device),
                now=utcnow(),
                settle_leases=settle,
            )
        if job is not None:
            log_claims([job])
        return job

    def claim_pack(self, size: int) -> list[Job]:
        """The oldest claimable job and up to ``size - 1`` more that can share its steps
        (:mod:`workers.packed`), in one transaction; none when nothing is claimable."""
        settle = self._settles()
        with self.sessions.begin() as session:
            now = utcnow()
            device = str(self.device)
            first = queue_repo.claim_job(
                session,
                worker_id=self.worker_id,
                lease_s=self.settings.lease_s,
                device=device,
                now=now,
                settle_leases=settle,
            )
            if first is None:
                return []
            more = claim_more(
                session,
                first=first,
                fields=PACK_FIELDS,
                limit=size - 1,
                worker_id=self.worker_id,
                lease_s=self.settings.lease_s,
                device=device,
                now=now,
            )
        jobs = [first, *more]
        log_claims(jobs)
        return jobs

    def start_job(
        self, job: Job, *, tune_threads: bool = True
    ) -> tuple[Claim, JobCreate, int, Reporter]:
        """What a claimed job trains with, whichever path trains it: its claim (the fence),
        parameters, seed, and the reporter that records it and says when it must stop.

        ``tune_threads=False`` for all but one of a pack's jobs: the tuner times one
        reporter's steps."""
        claim = Claim(job.id, job.attempt, self.worker_id)
        params = params_of(job)
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        reporter = Reporter(
            claim=claim,
            params=params,
            sessions=self.sessions,
            limits=Limits(
                lease_s=self.settings.lease_s,
                flush_interval_s=self.settings.flush_interval_s,
                max_runtime_s=job.max_runtime_s or self.settings.max_runtime_s,
                shutdown_grace_s=self.settings.shutdown_grace_s,
            ),
            stop=self.stop,
            checkpoint_dir=self.settings.checkpoint_dir,
            artifacts=self.artifacts,
            show_progress=self.show_progress,
            threads=self.threads if tune_threads else None,
            outage=self.outage,
            max_buffered_steps=self.settings.outage_buffer_steps,
            writers=self.writers,
        )
        return claim, params, seed, reporter

    def run_job(self, job: Job) -> Outcome:
        """Train a claimed job and record how it ended; never raises for the job's own faults."""
        claim, params, seed, reporter = self.start_job(job)
        self.heartbeat.reporters = (reporter,)

        def trained() -> SimpleMLP:
            resume_from = self.resume_point(job, claim, reporter)
            log.info(
                "job %s attempt %d: training %s on %s%s",
                job.id,
                job.attempt,
                params,
                self.device,
                f", resuming after epoch {job.resume_epoch}" if resume_from else "",
            )
            graphs = graph_backend(self.device, self.settings.cuda_graphs)
            return train(params, self.data(), self.device, seed, reporter, resume_from, graphs)

        try:
            return self.endings.conclude(claim, reporter, trained)
        finally:
            self.heartbeat.reporters = ()
            reporter.close()

    def data(self) -> Mnist:
        """MNIST on this worker's device (loaded once per process)."""
        return load_mnist(
            self.settings.data_dir, device=self.device, download=self.settings.download
        )

    def resume_point(self, job: Job, claim: Claim, reporter: Reporter) -> SavedState | None:
        """The saved state a retried job continues from (whichever worker saved it, when it
        is in the database); None to start at epoch 1, also where it is missing or damaged."""
        ref = job.resume_checkpoint
        if job.resume_epoch == 0 or ref is None:
            return None
        source = self._retry(lambda: self.source.open(ref), "read the training state")
        where = self.source.where(ref)
        if source is None:
            log.warning("job %s: %s is missing, starting over", job.id, where)
        else:
            try:
                saved = usable_state(source, epoch=job.resume_epoch)
            except UnusableState as exc:
                log.warning("job %s: %s cannot be used (%s), starting over", job.id, where, exc)
            else:
                reporter.resume_at(job.resume_epoch, job.accuracy)
                return saved

        def forget() -> None:
            with self.sessions.begin() as session:
                queue_repo.forget_resume_point(
                    session, job_id=claim.job_id, attempt=claim.attempt, worker_id=claim.worker_id
                )

        self._retry(forget, "forget the resume point")
        return None
