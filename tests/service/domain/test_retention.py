"""Retention (MNIST_RETENTION_DAYS): old ended jobs go, the rest stay, one pass per period
across processes, with the clock under the test's control; and the API runs it by itself."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.clock import utcnow
from service.domain import sweeps
from service.domain.retention import PERIOD, Retention, RetentionThread
from service.schemas.sweeps import SweepCreate
from service.serving import registry
from service.settings import Settings
from service.status import JobStatus
from service.store import job_repo, queue_repo
from service.store.tables import Job, Sweep
from tests.records import PARAMS, FakeTraining, ended_job
from tests.support import together, wait_for

NOW = datetime.fromisoformat("2026-06-01T12:00:00+00:00")


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def exists(sessions: sessionmaker[Session], job_id: str) -> bool:
    with sessions() as session:
        return session.get(Job, job_id) is not None


def test_ended_jobs_older_than_the_retention_go_and_the_rest_stay(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    old = NOW - timedelta(days=8)
    ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
    expired = [ended_job(sessions, tmp_path, status, at=old).job_id for status in ended]
    aliased = ended_job(sessions, tmp_path, at=old).job_id
    with sessions() as session:
        registry.set_alias(session, "production", aliased)
    recent = ended_job(sessions, tmp_path, at=NOW - timedelta(days=6)).job_id
    running = FakeTraining(sessions, PARAMS, clock=old)
    running.submit()
    running.claim()
    queued = FakeTraining(sessions, PARAMS, clock=old)
    queued.submit()

    deleted = Retention(sessions, tmp_path, days=7, clock=Clock(NOW)).run_once()

    assert deleted == 3
    assert not any(exists(sessions, job_id) for job_id in expired)
    assert not [p for p in tmp_path.iterdir() if any(j in p.name for j in expired)]
    for job_id in (aliased, recent, running.job_id, queued.job_id):
        assert exists(sessions, job_id)


def test_a_pass_lists_the_checkpoint_folder_once_per_batch(
    sessions: sessionmaker[Session], tmp_path: Path, folder_scans: list[str]
) -> None:
    """Two globs per job deleted: a pass cost its jobs times the folder's files. Here one
    listing for the batch of jobs and one for the batch of sweeps."""
    old = NOW - timedelta(days=8)
    folder = tmp_path / "checkpoints"
    for _ in range(4):
        ended_job(sessions, folder, at=old)
    body = SweepCreate.model_validate({"grid": {"seed": [1, 2, 3]}})
    with sessions() as session:
        sweep = sweeps.create(
            session, body, max_trials=8, max_attempts=1, max_queued=99, max_steps=10**6
        )
        sweeps.cancel(session, sweep.id)
    with sessions.begin() as session:
        session.execute(update(Sweep).where(Sweep.id == sweep.id).values(finished_at=old))
    for trial in sweep.trials:
        (folder / f"{trial.job_id}-1-e1.resume.pt").write_bytes(b"")
    folder_scans.clear()

    deleted = Retention(sessions, folder, days=7, clock=Clock(NOW)).run_once()

    assert deleted == 5
    assert folder_scans == [str(folder)] * 2
    assert not list(folder.iterdir())


def test_it_runs_once_per_period_whoever_asks(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    clock = Clock(NOW)
    first = ended_job(sessions, tmp_path, at=NOW - timedelta(days=3)).job_id
    # Two API processes (here: two instances on the same database) ask at the same moment.
    processes = [Retention(sessions, tmp_path, days=2, clock=clock) for _ in range(4)]
    answers = together([p.run_once for p in processes])
    assert sorted(answers, key=lambda a: a is None) == [1, None, None, None]
    assert not exists(sessions, first)

    second = ended_job(sessions, tmp_path, at=NOW - timedelta(days=3)).job_id
    clock.now = NOW + PERIOD - timedelta(seconds=1)
    assert [p.run_once() for p in processes] == [None] * 4  # within the period: nobody
    assert exists(sessions, second)
    clock.now = NOW + PERIOD
    assert processes[2].run_once() == 1
    assert not exists(sessions, second)


def test_it_works_through_every_batch(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    old = NOW - timedelta(days=30)
    jobs = [ended_job(sessions, tmp_path, at=old).job_id for _ in range(5)]
    assert Retention(sessions, tmp_path, days=1, clock=Clock(NOW), batch=2).run_once() == 5
    assert not any(exists(sessions, job_id) for job_id in jobs)


def test_the_thread_runs_a_pass_at_start_and_stops(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = ended_job(sessions, tmp_path, at=NOW - timedelta(days=3)).job_id
    thread = RetentionThread(Retention(sessions, tmp_path, days=1, clock=Clock(NOW)), 3600)
    thread.start()
    try:
        wait_for(lambda: thread.passes >= 1, timeout_s=30, what="the first retention pass")
    finally:
        thread.stop()
    assert not exists(sessions, job_id)


def test_the_api_deletes_expired_jobs_by_itself(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    expired = ended_job(
        sessions, settings.checkpoint_dir, at=utcnow() - timedelta(days=2, minutes=1)
    ).job_id
    kept = ended_job(sessions, settings.checkpoint_dir, at=utcnow() - timedelta(days=1)).job_id
    with TestClient(create_app(settings.model_copy(update={"retention_days": 2}))) as client:
        wait_for(
            lambda: client.get(f"/jobs/{expired}").status_code == 404,
            timeout_s=30,
            what="retention to delete the expired job",
        )
        assert client.get(f"/jobs/{kept}").status_code == 200


def ended_trials(
    sessions: sessionmaker[Session], checkpoints: Path, trials: int, *, ended: int, at: datetime
) -> tuple[str, list[str]]:
    """A sweep of ``trials`` trials, the first ``ended`` of them succeeded at ``at`` (each
    with its weights file); the others stay queued."""
    grid = {"seed": list(range(trials))}
    body = SweepCreate.model_validate({"params": PARAMS.model_dump(), "grid": grid})
    with sessions() as session:
        sweep_id = sweeps.create(
            session, body, max_trials=256, max_attempts=1, max_queued=1000, max_steps=10**6
        ).id
    done = []
    for _ in range(ended):
        with sessions.begin() as session:
            job = queue_repo.claim_job(session, worker_id="w", lease_s=30, device="cpu", now=at)
            assert job is not None and job.sweep_id == sweep_id
            job_id, attempt = job.id, job.attempt
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / f"{job_id}-{attempt}.pt").write_bytes(b"weights")
        with sessions.begin() as session:
            queue_repo.finish_job(
                session,
                job_id=job_id,
                attempt=attempt,
                worker_id="w",
                status=JobStatus.SUCCEEDED,
                now=at,
                checkpoint=f"{job_id}-{attempt}.pt",
            )
        done.append(job_id)
    return sweep_id, done


def sweep_exists(sessions: sessionmaker[Session], sweep_id: str) -> bool:
    with sessions() as session:
        return session.get(Sweep, sweep_id) is not None


def test_old_ended_sweeps_go_whole_and_no_trial_goes_alone(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    old, recent = NOW - timedelta(days=8), NOW - timedelta(days=6)
    expired, expired_trials = ended_trials(sessions, tmp_path, 2, ended=2, at=old)
    emptied, (emptied_trial,) = ended_trials(sessions, tmp_path, 1, ended=1, at=old)
    with sessions.begin() as session:  # its one trial deleted alone (DELETE /jobs/{id})
        job_repo.delete_job(session, emptied_trial)
    aliased, (aliased_trial, _) = ended_trials(sessions, tmp_path, 2, ended=2, at=old)
    with sessions() as session:
        registry.set_alias(session, "production", aliased_trial)
    kept, kept_trials = ended_trials(sessions, tmp_path, 2, ended=2, at=recent)
    running, (old_trial,) = ended_trials(sessions, tmp_path, 2, ended=1, at=old)

    deleted = Retention(sessions, tmp_path, days=7, clock=Clock(NOW)).run_once()

    assert deleted == 2  # two sweeps: the expired one (with its trials) and the emptied one
    assert not sweep_exists(sessions, expired) and not sweep_exists(sessions, emptied)
    assert not any(exists(sessions, job_id) for job_id in expired_trials)
    assert not [p for p in tmp_path.iterdir() if any(j in p.name for j in expired_trials)]
    for sweep_id in (aliased, kept, running):
        assert sweep_exists(sessions, sweep_id)
    # An old ended trial of a running sweep stays with it, as do the kept sweeps' trials.
    for job_id in (old_trial, aliased_trial, *kept_trials):
        assert exists(sessions, job_id)


def test_sweeps_kept_for_an_alias_do_not_hide_the_expired_behind_them(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    oldest, (aliased_trial,) = ended_trials(
        sessions, tmp_path, 1, ended=1, at=NOW - timedelta(days=9)
    )
    with sessions() as session:
        registry.set_alias(session, "production", aliased_trial)
    expired, _ = ended_trials(sessions, tmp_path, 1, ended=1, at=NOW - timedelta(days=8))

    # One sweep a batch: the aliased one, listed first, would fill every batch.
    assert Retention(sessions, tmp_path, days=7, clock=Clock(NOW), batch=1).run_once() == 1
    assert sweep_exists(sessions, oldest) and not sweep_exists(sessions, expired)
