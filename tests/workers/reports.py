"""A training report that keeps every loss and accuracy in memory, for tests of the loop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.schemas import JobCreate
from service.store import queue_repo
from tests.jobs import queue_job
from workers.reporting import Claim, Limits, Reporter
from workers.resume import TrainingState


class Recorder:
    """What ``train`` reports: each step's loss (read at once) and each epoch's accuracy."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.accuracies: list[tuple[int, float]] = []

    def step(self, loss: torch.Tensor) -> None:
        """Keep the step's loss."""
        self.losses.append(float(loss))

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Keep the epoch's accuracy and the state a resume would use."""
        self.accuracies.append((epoch, accuracy))
        self.state = state


class DiesAfterFirstEpoch(Recorder):
    """Saves the state after epoch 1 to ``path``, then dies as a killed worker would."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Record, save, and stop the run."""
        super().epoch(epoch, accuracy, state)
        state.save(self.path, epoch)
        raise KeyboardInterrupt  # the worker dies here


def claimed_reporter(
    sessions: sessionmaker[Session],
    params: dict[str, Any],
    *,
    writes: sessionmaker[Session],
    checkpoint_dir: Path,
    limits: Limits,
    stop: threading.Event | None = None,
    **kwargs: Any,
) -> tuple[Reporter, str]:
    """A job queued and claimed by worker "w" (attempt 1), and the reporter its loop would
    call, writing through ``writes`` (the sessions, or a stand-in that fails on demand)."""
    job_id = queue_job(sessions, params)
    with sessions.begin() as session:
        job = queue_repo.claim_job(session, worker_id="w", lease_s=30, device="cpu", now=utcnow())
        assert job is not None
    reporter = Reporter(
        claim=Claim(job_id, 1, "w"),
        params=JobCreate.model_validate(params),
        sessions=writes,
        limits=limits,
        stop=stop or threading.Event(),
        checkpoint_dir=checkpoint_dir,
        show_progress=False,
        **kwargs,
    )
    return reporter, job_id
