"""Training states written in the background: the job's row names one only once it is durable,
as it was when the epoch ended; a stopping worker waits for it; an orphan is deleted."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from service.ml import SimpleMLP, atomic_torch_save
from tests.jobs import read_job
from tests.support import SMALL_TRAIN, wait_for
from tests.workers.reports import claimed_reporter
from workers import resume
from workers.reporting import Limits, Reporter, Shutdown
from workers.resume import TrainingState
from workers.train import make_optimizer

PARAMS = {"epochs": 2, "batch_size": 64, "trainset_size": SMALL_TRAIN}


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds every training-state write until set (then writes it the real way)."""
    opened = threading.Event()
    real = atomic_torch_save

    def held(obj: object, path: Path) -> None:
        assert opened.wait(timeout=30)
        real(obj, path)

    monkeypatch.setattr(resume, "atomic_torch_save", held)
    yield opened
    opened.set()


def running_job(
    sessions: sessionmaker[Session], tmp_path: Path, stop: threading.Event
) -> tuple[Reporter, str, TrainingState]:
    reporter, job_id = claimed_reporter(
        sessions,
        PARAMS,
        writes=sessions,
        checkpoint_dir=tmp_path / "models",
        limits=Limits(lease_s=30, flush_interval_s=3600, shutdown_grace_s=60),
        stop=stop,
    )
    model = SimpleMLP()
    optimizer = make_optimizer(model, 1e-3, torch.device("cpu"))
    state = TrainingState(model, optimizer, torch.Generator().manual_seed(0))
    for _ in range(reporter.steps_per_epoch):
        reporter.step(torch.tensor(1.0))
    return reporter, job_id, state


def saved(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = torch.load(path, weights_only=True)
    return loaded


def test_the_row_names_a_state_once_it_is_durable_as_it_was_at_the_epochs_end(
    sessions: sessionmaker[Session], tmp_path: Path, gate: threading.Event
) -> None:
    reporter, job_id, state = running_job(sessions, tmp_path, threading.Event())
    at_epoch_end = {k: v.clone() for k, v in state.model.state_dict().items()}
    reporter.epoch(1, 0.9, state)
    job = read_job(sessions, job_id)
    assert (job.epoch, job.accuracy) == (1, 0.9)  # the epoch is recorded at once...
    assert (job.resume_epoch, job.resume_checkpoint) == (0, None)  # ...its state is not yet
    with torch.no_grad():  # the next epoch trains on while the state is being written
        for p in state.model.parameters():
            p.add_(1.0)

    gate.set()
    path = tmp_path / "models" / f"{job_id}-1-e1.resume.pt"
    wait_for(path.exists, timeout_s=10, what="the state to be written")
    reporter.flush()
    job = read_job(sessions, job_id)
    assert (job.resume_epoch, job.resume_checkpoint) == (1, path.name)
    state_file = saved(path)
    assert state_file["epoch"] == 1
    for name, value in at_epoch_end.items():
        assert torch.equal(state_file["model"][name], value)
    reporter.close()
    assert path.exists()  # named by the row: kept


def test_a_stopping_worker_hands_the_job_back_with_the_state_in_flight_named(
    sessions: sessionmaker[Session], tmp_path: Path, gate: threading.Event
) -> None:
    stop = threading.Event()
    reporter, job_id, state = running_job(sessions, tmp_path, stop)
    stop.set()
    threading.Timer(0.2, gate.set).start()
    with pytest.raises(Shutdown, match="resumes after this epoch"):
        reporter.epoch(1, 0.9, state)
    job = read_job(sessions, job_id)
    assert (job.resume_epoch, job.resume_checkpoint) == (1, f"{job_id}-1-e1.resume.pt")
    assert (tmp_path / "models" / str(job.resume_checkpoint)).is_file()
    reporter.close()


def test_a_stop_that_comes_during_the_epochs_flush_still_names_its_state(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    gate: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stop = threading.Event()
    reporter, job_id, state = running_job(sessions, tmp_path, stop)
    real_flush = reporter._buffer.flush

    def flush_then_stop() -> tuple[int, bool]:
        # The signal lands after the flush looked at the stop request (it did not wait for
        # the state then), but before the policy reads it at the epoch's end.
        written = real_flush()
        stop.set()
        return written

    monkeypatch.setattr(reporter._buffer, "flush", flush_then_stop)
    threading.Timer(0.2, gate.set).start()
    with pytest.raises(Shutdown, match="resumes after this epoch"):
        reporter.epoch(1, 0.9, state)
    job = read_job(sessions, job_id)
    assert (job.resume_epoch, job.resume_checkpoint) == (1, f"{job_id}-1-e1.resume.pt")
    reporter.close()


def test_a_state_still_in_flight_when_the_job_ends_is_not_left_behind(
    sessions: sessionmaker[Session], tmp_path: Path, gate: threading.Event
) -> None:
    reporter, job_id, state = running_job(sessions, tmp_path, threading.Event())
    reporter.epoch(1, 0.9, state)
    threading.Timer(0.2, gate.set).start()
    reporter.close()  # the job ended (cancelled, lost…) before its row named the state
    assert list((tmp_path / "models").iterdir()) == []  # neither the file nor a temporary one
    assert read_job(sessions, job_id).resume_checkpoint is None
