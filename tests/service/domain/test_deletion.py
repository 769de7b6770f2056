"""Deleting a job: its rows in one transaction, its files after, and every race it meets (a
worker finishing the job, an alias being pointed at it) decided one way, on both databases."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from service.domain import deletion
from service.errors import Conflict, LeaseLost, NotFound
from service.serving import registry
from service.status import JobStatus
from service.store.tables import EpochMetric, Job, ModelAlias, TrainStep
from tests.records import PARAMS, FakeTraining, ended_job
from tests.support import wait_for


def rows_of(sessions: sessionmaker[Session], job_id: str) -> dict[str, int]:
    """How many rows of each table name the job."""
    columns = {
        "jobs": Job.id,
        "train_steps": TrainStep.job_id,
        "epoch_metrics": EpochMetric.job_id,
        "model_aliases": ModelAlias.job_id,
    }
    with sessions() as session:
        return {
            name: session.scalar(
                select(func.count()).select_from(column.table).where(column == job_id)
            )
            or 0
            for name, column in columns.items()
        }


def files_of(checkpoint_dir: Path, job_id: str) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.iterdir() if job_id in p.name)


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_an_ended_job_goes_with_its_rows_and_files(
    sessions: sessionmaker[Session], tmp_path: Path, status: JobStatus
) -> None:
    kept = ended_job(sessions, tmp_path)
    gone = ended_job(sessions, tmp_path, status)
    assert rows_of(sessions, gone.job_id)["train_steps"] == 8
    with sessions() as session:
        deleted = deletion.delete_job_and_artifacts(session, tmp_path, gone.job_id)
    assert deleted.checkpoint == (f"{gone.job_id}-1.pt" if status == JobStatus.SUCCEEDED else None)
    assert set(rows_of(sessions, gone.job_id).values()) == {0}
    assert files_of(tmp_path, gone.job_id) == []
    # The other job is untouched.
    assert rows_of(sessions, kept.job_id)["train_steps"] == 8
    assert len(files_of(tmp_path, kept.job_id)) == 3


def test_unknown_queued_running_and_aliased_jobs_are_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions() as session, pytest.raises(NotFound):
        deletion.delete_job(session, "0" * 32)
    queued = FakeTraining(sessions, PARAMS)
    queued.submit()
    with sessions() as session, pytest.raises(Conflict, match="is queued: cancel it first"):
        deletion.delete_job(session, queued.job_id)
    queued.claim()
    with sessions() as session, pytest.raises(Conflict, match="is running: cancel it first"):
        deletion.delete_job(session, queued.job_id)
    aliased = ended_job(sessions, tmp_path)
    with sessions() as session:
        registry.set_alias(session, "production", aliased.job_id)
        registry.set_alias(session, "best", aliased.job_id)
    with sessions() as session, pytest.raises(Conflict, match="alias 'best' points at") as refused:
        deletion.delete_job(session, aliased.job_id)
    assert refused.value.details == [{"aliases": ["best", "production"]}]
    assert rows_of(sessions, aliased.job_id)["jobs"] == 1
    assert len(files_of(tmp_path, aliased.job_id)) == 3  # nothing removed for a refusal


def test_a_stale_workers_late_writes_find_no_job(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    training = ended_job(sessions, tmp_path, JobStatus.FAILED)
    with sessions() as session:
        deletion.delete_job(session, training.job_id)
    with pytest.raises(LeaseLost):
        training.advance(3)  # fenced: nothing written for a job that is gone
    assert rows_of(sessions, training.job_id)["train_steps"] == 0


# The races. The first party does its work and stops just before its commit, holding what it
# locked; the second starts and (on PostgreSQL, where it is visible) is seen waiting for a lock;
# then the first commits. Whichever order, the outcome must be one a serial order gives.


def hold_before_commit(session: Session) -> tuple[threading.Event, threading.Event]:
    """Make ``session``'s next commit wait: (reached, release)."""
    reached, release = threading.Event(), threading.Event()
    commit = session.commit

    def held() -> None:
        reached.set()
        assert release.wait(30)
        commit()

    session.commit = held  # type: ignore[method-assign]
    return reached, release


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects what it was
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def waiting_for_a_lock(sessions: sessionmaker[Session]) -> bool:
    """Whether another connection of this database waits for a lock (PostgreSQL); SQLite
    cannot say, and its IMMEDIATE transactions serialise anyway."""
    with sessions() as session:
        if session.get_bind().dialect.name != "postgresql":
            return True
        waiting = session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        )
        return bool(waiting)


def race(
    sessions: sessionmaker[Session],
    first: Callable[[Session], Any],
    second: Callable[[Session], Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``first`` up to its commit, then ``second`` against it; both outcomes."""
    first_session, second_session = sessions(), sessions()
    try:
        reached, release = hold_before_commit(first_session)
        first_thread, first_outcome = in_thread(lambda: first(first_session))
        assert reached.wait(30), first_outcome
        second_thread, second_outcome = in_thread(lambda: second(second_session))
        try:
            wait_for(
                lambda: waiting_for_a_lock(sessions),
                timeout_s=30,
                what="the second party to wait for the first's lock",
            )
        finally:
            release.set()
        first_thread.join(30)
        second_thread.join(30)
        return first_outcome, second_outcome
    finally:
        first_session.close()
        second_session.close()


def test_a_delete_that_comes_first_makes_a_concurrent_alias_404(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = ended_job(sessions, tmp_path).job_id
    deleted, aliased = race(
        sessions,
        lambda s: deletion.delete_job(s, job_id),
        lambda s: registry.set_alias(s, "production", job_id),
    )
    assert "error" not in deleted, deleted
    assert isinstance(aliased.get("error"), NotFound), aliased
    assert rows_of(sessions, job_id)["jobs"] == 0
    with sessions() as session:
        assert session.get(ModelAlias, "production") is None


def test_an_alias_that_comes_first_makes_a_concurrent_delete_409(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = ended_job(sessions, tmp_path).job_id
    aliased, deleted = race(
        sessions,
        lambda s: registry.set_alias(s, "production", job_id),
        lambda s: deletion.delete_job(s, job_id),
    )
    assert "error" not in aliased, aliased
    assert isinstance(deleted.get("error"), Conflict), deleted
    assert "'production'" in deleted["error"].message
    with sessions() as session:
        alias = session.get(ModelAlias, "production")
        assert alias is not None and alias.job_id == job_id
    assert rows_of(sessions, job_id)["jobs"] == 1


def test_a_delete_waits_for_the_worker_finishing_the_job_and_then_deletes_it(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    training = FakeTraining(sessions, PARAMS)
    training.submit()
    training.claim()
    training.run_epoch(0.5)

    def finish(session: Session) -> None:
        training.finish_in(session, JobStatus.SUCCEEDED, checkpoint="x.pt")
        session.commit()

    finished, deleted = race(sessions, finish, lambda s: deletion.delete_job(s, training.job_id))
    assert "error" not in finished, finished
    # It read the status the worker committed (succeeded), not the one before (running).
    assert "error" not in deleted, deleted
    assert deleted["value"].checkpoint == "x.pt"
    assert set(rows_of(sessions, training.job_id).values()) == {0}


def test_a_worker_claim_never_takes_or_meets_a_job_being_deleted(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ended = ended_job(sessions, tmp_path, JobStatus.CANCELLED)
    queued = FakeTraining(sessions, PARAMS, worker_id="other")
    queued.submit()
    delete_session = sessions()
    try:
        reached, release = hold_before_commit(delete_session)
        thread, deleted = in_thread(lambda: deletion.delete_job(delete_session, ended.job_id))
        assert reached.wait(30)
        # A claim meanwhile: on SQLite it waits for the delete's write lock, on PostgreSQL
        # its SKIP LOCKED passes the locked row; either way it takes the queued job.
        claim_thread, claimed = in_thread(queued.claim)
        release.set()
        thread.join(30)
        claim_thread.join(30)
    finally:
        delete_session.close()
    assert "error" not in deleted and "error" not in claimed, (deleted, claimed)
    assert claimed["value"].id == queued.job_id
