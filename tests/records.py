"""Write a job's life straight into the database, as a worker would, step by step."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.schemas import JobCreate
from service.status import JobStatus
from service.steps import StepPlan
from service.store import job_repo, queue_repo
from service.store.tables import Job
from service.store.upkeep.db_clock import database_time

LEASE_S = 30.0
# A small job: 4 steps an epoch.
PARAMS = JobCreate(epochs=2, batch_size=64, trainset_size=256, testset_size=10)


def lapse_leases(sessions: sessionmaker[Session], *job_ids: str) -> None:
    """End the leases of these running jobs (of all, when none is named) a second ago, as if
    their workers had fallen silent a lease ago: a lease is on the database's clock
    (:mod:`service.store.upkeep.leases`), which no clock a test passes in moves."""
    stmt = update(Job).where(Job.status == JobStatus.RUNNING)
    if job_ids:
        stmt = stmt.where(Job.id.in_(job_ids))
    with sessions.begin() as session:
        session.execute(stmt.values(lease_expires_at=database_time(-1)))


@dataclass
class FakeTraining:
    """A job claimed by a pretend worker that records steps and epochs when told."""

    sessions: sessionmaker[Session]
    params: JobCreate
    worker_id: str = "test-worker"
    job_id: str = ""
    attempt: int = 0
    step: int = 0
    epoch: int = 0
    accuracy: float | None = None
    clock: datetime = field(default_factory=utcnow)

    @property
    def plan(self) -> StepPlan:
        """The job's step arithmetic (the same the worker uses)."""
        return StepPlan.of(self.params)

    @property
    def fence(self) -> dict[str, Any]:
        """What names this attempt in every write (the store's fence)."""
        return {"job_id": self.job_id, "attempt": self.attempt, "worker_id": self.worker_id}

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch."""
        return self.plan.steps_per_epoch

    def submit(self) -> str:
        """Queue the job."""
        with self.sessions.begin() as session:
            job = job_repo.create_job(session, self.params, max_attempts=3, now=self.clock)
            self.job_id = job.id
        return self.job_id

    def claim(self, *, lease_s: float = LEASE_S) -> Job:
        """Claim it (a new attempt: the recorded steps start over)."""
        with self.sessions.begin() as session:
            job = queue_repo.claim_job(
                session, worker_id=self.worker_id, lease_s=lease_s, device="cpu", now=self.clock
            )
        assert job is not None and job.id == self.job_id
        self.attempt, self.step, self.epoch = job.attempt, 0, 0
        return job

    def advance(self, steps: int, *, seconds: float = 1.0, end_epoch: float | None = None) -> None:
        """Record ``steps`` more steps (and an epoch's accuracy), ``seconds`` later."""
        rows: list[dict[str, Any]] = []
        for _ in range(steps):
            self.step += 1
            rows.append(self.plan.step_row(self.step, 2.3 / self.step))
        epochs = []
        if end_epoch is not None:
            self.epoch += 1
            self.accuracy = end_epoch
            epochs.append(
                {
                    "epoch": self.epoch,
                    "accuracy": end_epoch,
                    "examples_seen": self.plan.examples_seen(self.step),
                }
            )
        self.clock += timedelta(seconds=seconds)
        with self.sessions.begin() as session:
            queue_repo.record_progress(
                session,
                **self.fence,
                progress=queue_repo.Progress(
                    steps=rows,
                    epochs=epochs,
                    step=self.step,
                    epoch=self.epoch,
                    accuracy=self.accuracy,
                ),
                lease_s=LEASE_S,
                now=self.clock,
            )

    def release(self) -> None:
        """Give the job back to the queue, as a worker shutting down does."""
        with self.sessions.begin() as session:
            queue_repo.release_job(session, **self.fence, now=self.clock)

    def run_epoch(self, accuracy: float) -> None:
        """Record one whole epoch in two flushes."""
        half = self.steps_per_epoch // 2
        self.advance(half)
        self.advance(self.steps_per_epoch - half, end_epoch=accuracy)

    def finish(
        self,
        status: JobStatus = JobStatus.SUCCEEDED,
        error: str | None = None,
        *,
        checkpoint: str | None = None,
    ) -> None:
        """End the job."""
        with self.sessions.begin() as session:
            self.finish_in(session, status, error, checkpoint=checkpoint)

    def finish_in(
        self,
        session: Session,
        status: JobStatus = JobStatus.SUCCEEDED,
        error: str | None = None,
        *,
        checkpoint: str | None = None,
    ) -> None:
        """End the job in ``session``, uncommitted."""
        queue_repo.finish_job(
            session,
            **self.fence,
            status=status,
            now=self.clock,
            error=error,
            checkpoint=checkpoint,
        )


def ended_job(
    sessions: sessionmaker[Session],
    checkpoint_dir: Path,
    status: JobStatus = JobStatus.SUCCEEDED,
    *,
    at: datetime | None = None,
) -> FakeTraining:
    """A job trained two epochs by a pretend worker (from ``at``, default now) and ended,
    with its weights file (when it succeeded), a training state and a temporary file left in
    ``checkpoint_dir``."""
    training = FakeTraining(sessions, PARAMS, clock=at or utcnow())
    training.submit()
    training.claim()
    training.run_epoch(0.5)
    training.run_epoch(0.6)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    name = f"{training.job_id}-{training.attempt}.pt"
    (checkpoint_dir / f"{training.job_id}-{training.attempt}-e2.resume.pt").write_bytes(b"s")
    (checkpoint_dir / f".{name}.abc123.tmp").write_bytes(b"t")
    checkpoint = None
    if status == JobStatus.SUCCEEDED:
        (checkpoint_dir / name).write_bytes(b"weights")
        checkpoint = name
    training.finish(status, checkpoint=checkpoint)
    return training
