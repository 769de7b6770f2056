"""Write a job's life straight into the database, as a worker would, step by step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service import repository
from service.clock import utcnow
from service.models import Job, JobStatus
from service.schemas import JobCreate

LEASE_S = 30.0


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
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch."""
        return math.ceil(self.params.trainset_size / self.params.batch_size)

    def submit(self) -> str:
        """Queue the job."""
        with self.sessions.begin() as session:
            job = repository.create_job(session, self.params, max_attempts=3, now=self.clock)
            self.job_id = job.id
        return self.job_id

    def claim(self, *, lease_s: float = LEASE_S) -> Job:
        """Claim it (a new attempt: the recorded steps start over)."""
        with self.sessions.begin() as session:
            job = repository.claim_job(
                session, worker_id=self.worker_id, lease_s=lease_s, device="cpu", now=self.clock
            )
        assert job is not None and job.id == self.job_id
        self.attempt, self.step, self.epoch = job.attempt, 0, 0
        return job

    def examples_seen(self, step: int) -> int:
        """Images seen after ``step`` steps (as the worker's reporter counts them)."""
        full, in_epoch = divmod(step - 1, self.steps_per_epoch)
        n = self.params.trainset_size
        return full * n + min((in_epoch + 1) * self.params.batch_size, n)

    def advance(self, steps: int, *, seconds: float = 1.0, end_epoch: float | None = None) -> None:
        """Record ``steps`` more steps (and an epoch's accuracy), ``seconds`` later."""
        rows: list[dict[str, Any]] = []
        for _ in range(steps):
            self.step += 1
            rows.append(
                {
                    "step": self.step,
                    "epoch": (self.step - 1) // self.steps_per_epoch + 1,
                    "loss": 2.3 / self.step,
                    "examples_seen": self.examples_seen(self.step),
                }
            )
        epochs = []
        if end_epoch is not None:
            self.epoch += 1
            self.accuracy = end_epoch
            epochs.append(
                {
                    "epoch": self.epoch,
                    "accuracy": end_epoch,
                    "examples_seen": self.examples_seen(self.step),
                }
            )
        self.clock += timedelta(seconds=seconds)
        with self.sessions.begin() as session:
            repository.record_progress(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                worker_id=self.worker_id,
                progress=repository.Progress(
                    steps=rows,
                    epochs=epochs,
                    step=self.step,
                    epoch=self.epoch,
                    accuracy=self.accuracy,
                ),
                lease_s=LEASE_S,
                now=self.clock,
            )

    def run_epoch(self, accuracy: float) -> None:
        """Record one whole epoch in two flushes."""
        half = self.steps_per_epoch // 2
        self.advance(half)
        self.advance(self.steps_per_epoch - half, end_epoch=accuracy)

    def finish(self, status: str = JobStatus.SUCCEEDED, error: str | None = None) -> None:
        """End the job."""
        with self.sessions.begin() as session:
            repository.finish_job(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                worker_id=self.worker_id,
                status=status,
                now=self.clock,
                error=error,
            )
