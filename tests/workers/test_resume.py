"""Training states written in the background: the job's row names one only once it is durable,
as it was when the epoch ended; a stopping worker waits for it; an orphan is deleted."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.ml import SimpleMLP
from service.settings import ArtifactStore, Settings
from service.store.artifacts.backends import (
    Artifacts,
    ArtifactSource,
    DatabaseArtifacts,
    FolderArtifacts,
    Saved,
    artifacts_for,
)
from service.store.tables import Artifact
from tests.jobs import read_job
from tests.support import BOTH_STORES, SMALL_TRAIN, wait_for
from tests.workers.reports import claimed_reporter
from workers.reporting import Limits, Reporter, Shutdown
from workers.reporting.buffer import Batch
from workers.resume import TrainingState
from workers.training.train import make_optimizer

PARAMS = {"epochs": 2, "batch_size": 64, "trainset_size": SMALL_TRAIN}


# Every test here runs with the states written as files and as rows of the database.
pytestmark = BOTH_STORES


@pytest.fixture
def store(artifacts: ArtifactStore, tmp_path: Path) -> Artifacts:
    """The backend ``MNIST_ARTIFACTS=artifacts`` gives, its folder ``tmp_path / "models"``."""
    return artifacts_for(Settings(artifacts=artifacts, checkpoint_dir=tmp_path / "models"))


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds every training-state write until set (then writes it the real way)."""
    opened = threading.Event()
    for backend in (FolderArtifacts, DatabaseArtifacts):

        def held(self: Artifacts, obj: object, real: Any = backend.save, **names: Any) -> Saved:
            assert opened.wait(timeout=30)
            saved: Saved = real(self, obj, **names)
            return saved

        monkeypatch.setattr(backend, "save", held)
    yield opened
    opened.set()


def running_job(
    sessions: sessionmaker[Session], tmp_path: Path, stop: threading.Event, store: Artifacts
) -> tuple[Reporter, str, TrainingState]:
    reporter, job_id = claimed_reporter(
        sessions,
        PARAMS,
        writes=sessions,
        checkpoint_dir=tmp_path / "models",
        artifacts=store,
        limits=Limits(lease_s=30, flush_interval_s=3600, shutdown_grace_s=60),
        stop=stop,
    )
    model = SimpleMLP()
    optimizer = make_optimizer(model, 1e-3, torch.device("cpu"))
    state = TrainingState(model, optimizer, torch.Generator().manual_seed(0))
    for _ in range(reporter.steps_per_epoch):
        reporter.step(torch.tensor(1.0))
    return reporter, job_id, state


def saved(sessions: sessionmaker[Session], tmp_path: Path, ref: str | None) -> dict[str, Any]:
    """The training state the job's row names, read wherever it is stored."""
    assert ref is not None
    source = ArtifactSource(tmp_path / "models", sessions).open(ref)
    assert source is not None, f"{ref} is not stored"
    loaded: dict[str, Any] = torch.load(source, weights_only=True)
    return loaded


def ref_of(store: Artifacts, name: str) -> str:
    """What the job's row holds for the state ``name`` in this backend."""
    return name if isinstance(store, FolderArtifacts) else f"db:{name}"


def stored_names(sessions: sessionmaker[Session], tmp_path: Path) -> list[str]:
    """Every artifact there is: files in the folder (temporary ones too) and rows."""
    folder = tmp_path / "models"
    files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    with sessions() as session:
        rows = list(session.scalars(select(Artifact.name)))
    return files + rows


def test_the_row_names_a_state_once_it_is_durable_as_it_was_at_the_epochs_end(
    sessions: sessionmaker[Session], tmp_path: Path, gate: threading.Event, store: Artifacts
) -> None:
    reporter, job_id, state = running_job(sessions, tmp_path, threading.Event(), store)
    at_epoch_end = {k: v.clone() for k, v in state.model.state_dict().items()}
    reporter.epoch(1, 0.9, state)
    # The epoch is recorded by the write behind the loop, without waiting for its state...
    job = wait_for(
        lambda: j if (j := read_job(sessions, job_id)).epoch == 1 else None,
        timeout_s=10,
        what="the epoch's write",
    )
    assert (job.epoch, job.accuracy) == (1, 0.9)
    assert (job.resume_epoch, job.resume_checkpoint) == (0, None)  # ...its state is not yet
    with torch.no_grad():  # the next epoch trains on while the state is being written
        for p in state.model.parameters():
            p.add_(1.0)

    gate.set()

    def named() -> str | None:
        reporter.flush()  # names the state once it is written, not before
        return read_job(sessions, job_id).resume_checkpoint

    ref = wait_for(named, timeout_s=10, what="the state to be written and named")
    assert ref == ref_of(store, f"{job_id}-1-e1.resume.pt")
    assert read_job(sessions, job_id).resume_epoch == 1
    state_file = saved(sessions, tmp_path, ref)
    assert state_file["epoch"] == 1
    for name, value in at_epoch_end.items():
        assert torch.equal(state_file["model"][name], value)
    reporter.close()
    assert saved(sessions, tmp_path, ref)["epoch"] == 1  # named by the row: kept


def test_a_stopping_worker_hands_the_job_back_with_the_state_in_flight_named(
    sessions: sessionmaker[Session], tmp_path: Path, gate: threading.Event, store: Artifacts
) -> None:
    stop = threading.Event()
    reporter, job_id, state = running_job(sessions, tmp_path, stop, store)
    stop.set()
    threading.Timer(0.2, gate.set).start()
    with pytest.raises(Shutdown, match="resumes after this epoch"):
        reporter.epoch(1, 0.9, state)
    job = read_job(sessions, job_id)
    assert (job.resume_epoch, job.resume_checkpoint) == (
        1,
        ref_of(store, f"{job_id}-1-e1.resume.pt"),
    )
    assert saved(sessions, tmp_path, job.resume_checkpoint)["epoch"] == 1
    reporter.close()


def test_a_stop_that_comes_during_the_epochs_flush_still_names_its_state(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    gate: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
    store: Artifacts,
) -> None:
    stop = threading.Event()
    reporter, job_id, state = running_job(sessions, tmp_path, stop, store)
    real_take = reporter._buffer.take

    def take_then_stop() -> Batch:
        # The signal lands after the epoch's write looked at the stop request (it did not
        # wait for the state then), but before the policy reads it at the epoch's end.
        batch = real_take()
        stop.set()
        return batch

    monkeypatch.setattr(reporter._buffer, "take", take_then_stop)
    threading.Timer(0.2, gate.set).start()
    with pytest.raises(Shutdown, match="resumes after this epoch"):
        reporter.epoch(1, 0.9, state)
    job = read_job(sessions, job_id)
    assert (job.resume_epoch, job.resume_checkpoint) == (
        1,
        ref_of(store, f"{job_id}-1-e1.resume.pt"),
    )
    reporter.close()


def test_a_state_still_in_flight_when_the_job_ends_is_not_left_behind(
    sessions: sessionmaker[Session], tmp_path: Path, gate: threading.Event, store: Artifacts
) -> None:
    reporter, job_id, state = running_job(sessions, tmp_path, threading.Event(), store)
    reporter.epoch(1, 0.9, state)
    threading.Timer(0.2, gate.set).start()
    reporter.close()  # the job ended (cancelled, lost…) before its row named the state
    assert stored_names(sessions, tmp_path) == []  # no file, no temporary one, no row
    assert read_job(sessions, job_id).resume_checkpoint is None


def test_an_older_state_is_deleted_off_the_loop_once_a_newer_one_is_named(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store: Artifacts,
) -> None:
    if not isinstance(store, FolderArtifacts):
        pytest.skip("a state stored as a row replaces the older ones in its transaction")
    deleting: list[str] = []
    real_keep = FolderArtifacts.keep_resume

    def keep_resume(self: FolderArtifacts, job_id: str, keep: Any) -> None:
        deleting.append(threading.current_thread().name)
        real_keep(self, job_id, keep)

    monkeypatch.setattr(FolderArtifacts, "keep_resume", keep_resume)
    reporter, job_id = claimed_reporter(
        sessions,
        {**PARAMS, "epochs": 3},
        writes=sessions,
        checkpoint_dir=tmp_path / "models",
        artifacts=store,
        limits=Limits(lease_s=30, flush_interval_s=3600),
    )
    model = SimpleMLP()
    optimizer = make_optimizer(model, 1e-3, torch.device("cpu"))
    state = TrainingState(model, optimizer, torch.Generator().manual_seed(0))
    for epoch in (1, 2):
        for _ in range(reporter.steps_per_epoch):
            reporter.step(torch.tensor(1.0))
        reporter.epoch(epoch, 0.9, state)
        reporter.drain()  # waits for the state and names it
    reporter.close()  # waits for the deletions
    assert read_job(sessions, job_id).resume_checkpoint == f"{job_id}-1-e2.resume.pt"
    assert stored_names(sessions, tmp_path) == [f"{job_id}-1-e2.resume.pt"]
    assert deleting and all(name.startswith("resume-state") for name in deleting)


def test_a_state_is_named_by_the_next_steps_not_at_the_next_flush_interval(
    sessions: sessionmaker[Session], tmp_path: Path, gate: threading.Event, store: Artifacts
) -> None:
    reporter, job_id, state = running_job(sessions, tmp_path, threading.Event(), store)
    reporter.epoch(1, 0.9, state)  # the flush interval is an hour: only the state's write calls
    gate.set()

    def named() -> bool | None:
        reporter.step(torch.tensor(1.0))  # the loop goes on; a step hands the flush over
        return read_job(sessions, job_id).resume_epoch == 1 or None

    wait_for(named, timeout_s=30, what="the state to be named", every_s=0.01)
    assert read_job(sessions, job_id).resume_checkpoint == ref_of(store, f"{job_id}-1-e1.resume.pt")
    reporter.close()
