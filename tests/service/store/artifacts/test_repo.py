"""Artifacts stored as rows: written by the fenced transaction that names them, or not at all."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import LeaseLost
from service.ml import SimpleMLP, load_model
from service.status import JobStatus
from service.store import queue_repo
from service.store.artifacts import repo as artifacts_repo
from service.store.artifacts.backends import ArtifactSource, DatabaseArtifacts, Saved
from service.store.tables import Artifact, Job
from tests.jobs import read_job
from tests.records import lapse_leases
from tests.service.store.test_repository import LEASE_S, add_job, claim

STATE = {"epoch": 1, "weights": torch.arange(4.0)}


def stored(sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
    with sessions() as session:
        return [
            (name, kind) for name, kind in session.execute(select(Artifact.name, Artifact.kind))
        ]


def fence(job: Job, worker: str) -> dict[str, Any]:
    """What a worker's writes are fenced on: the attempt it claimed."""
    return {"job_id": job.id, "attempt": job.attempt, "worker_id": worker}


def record_state(sessions: sessionmaker[Session], job: Job, worker: str, saved: Saved) -> None:
    progress = queue_repo.Progress(
        steps=[],
        epochs=[],
        step=0,
        epoch=1,
        accuracy=None,
        resume_checkpoint=saved.ref,
        resume_blob=saved.blob,
    )
    with sessions.begin() as session:
        queue_repo.record_progress(
            session, **fence(job, worker), progress=progress, lease_s=LEASE_S, now=utcnow()
        )


def finish(sessions: sessionmaker[Session], job: Job, worker: str, saved: Saved) -> None:
    with sessions.begin() as session:
        queue_repo.finish_job(
            session,
            **fence(job, worker),
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
            checkpoint=saved.ref,
            checkpoint_blob=saved.blob,
        )


def test_a_state_and_the_weights_are_stored_with_the_rows_that_name_them(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    add_job(sessions)
    job = claim(sessions, "w")
    assert job is not None
    store, source = DatabaseArtifacts(), ArtifactSource(tmp_path, sessions)
    first = store.save(STATE, job_id=job.id, attempt=1, epoch=1)
    record_state(sessions, job, "w", first)
    second = store.save({**STATE, "epoch": 2}, job_id=job.id, attempt=1, epoch=2)
    record_state(sessions, job, "w", second)
    row = read_job(sessions, job.id)
    assert (row.resume_checkpoint, row.resume_epoch) == (second.ref, 1)
    # The newer state replaced the older one in its transaction; it reads back whole.
    assert stored(sessions) == [(f"{job.id}-1-e2.resume.pt", "resume")]
    found = source.open(second.ref)
    assert isinstance(found, io.BytesIO)
    assert torch.load(found, weights_only=True)["epoch"] == 2
    assert source.open(first.ref) is None

    weights = store.save(SimpleMLP().state_dict(), job_id=job.id, attempt=1)
    finish(sessions, job, "w", weights)
    row = read_job(sessions, job.id)
    assert (row.status, row.checkpoint) == (JobStatus.SUCCEEDED, f"db:{job.id}-1.pt")
    assert stored(sessions) == [(f"{job.id}-1.pt", "checkpoint")]  # the states went with it
    found = source.open(weights.ref)
    assert found is not None
    load_model(found)
    with sessions() as session:
        assert artifacts_repo.sizes(session, [f"{job.id}-1.pt"]) == {
            f"{job.id}-1.pt": len(weights.blob.data)  # type: ignore[union-attr]
        }


def test_a_worker_that_lost_its_lease_stores_no_state_and_no_weights(
    sessions: sessionmaker[Session],
) -> None:
    add_job(sessions)
    start = utcnow()
    old = claim(sessions, "old", now=start)
    assert old is not None
    lapse_leases(sessions)
    new = claim(sessions, "new")
    assert new is not None and new.attempt == 2
    store = DatabaseArtifacts()
    with pytest.raises(LeaseLost):
        record_state(sessions, old, "old", store.save(STATE, job_id=old.id, attempt=1, epoch=1))
    with pytest.raises(LeaseLost):
        finish(sessions, old, "old", store.save(STATE, job_id=old.id, attempt=1))
    assert stored(sessions) == []
    job = read_job(sessions, old.id)
    assert (job.status, job.checkpoint, job.resume_checkpoint) == (JobStatus.RUNNING, None, None)
