"""Packed jobs in the worker (MNIST_PACK_MAX > 1), against a real migrated database (both).

What happens to one job mid-pack (a cancel, a stolen lease, a stop) is made to happen at a
chosen step of that job, from inside its reporter's ``step``, so no test depends on how fast
the pack trains. The losses a pack records are compared with the same jobs trained alone, to
the tolerance tests/workers/training/test_packing.py measures and justifies.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.settings import Settings
from service.status import JobStatus
from service.store import job_repo, metric_repo
from service.store.tables import Job
from service.store.wakeups import StopEvent
from tests.jobs import queue_job, read_job
from tests.support import (
    SMALL_TEST,
    SMALL_TRAIN,
    local_env,
    overwrite_artifact,
    process,
    wait_for,
)
from tests.workers.training.test_packing import LOSS_ATOL, LOSS_RTOL
from tests.workers.tuning.test_threads import Counting
from workers.reporting import Reporter
from workers.training.packing import Unpackable
from workers.tuning.threads import candidate_threads
from workers.worker import Worker

PARAMS = {"epochs": 2, "batch_size": 32, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
TRIALS: list[dict[str, int | float]] = [
    {"seed": 1, "learning_rate": 1e-3},
    {"seed": 2, "learning_rate": 3e-3},
    {"seed": 3},
]
STEPS = 2 * SMALL_TRAIN // 32


def submit(sessions: sessionmaker[Session], **params: int | float) -> str:
    return queue_job(sessions, {**PARAMS, **params})


def packing(settings: Settings, pack_max: int = 4) -> Settings:
    return settings.model_copy(update={"pack_max": pack_max})


def losses(sessions: sessionmaker[Session], job_id: str) -> list[float]:
    with sessions() as session:
        steps = metric_repo.read_steps(session, job_id, after_step=0, limit=10_000)
    return [s["loss"] for s in steps]


@pytest.fixture
def at_step(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, int, Callable[[], None]], None]:
    """``at_step(job_id, n, act)``: ``act()`` runs just before job ``job_id``'s step ``n`` is
    reported (its reporter's ``step``), once."""
    hooks: dict[tuple[str, int], Callable[[], None]] = {}
    seen: Counter[str] = Counter()
    step = Reporter.step

    def hooked(self: Reporter, loss: torch.Tensor) -> None:
        seen[self.claim.job_id] += 1
        act = hooks.pop((self.claim.job_id, seen[self.claim.job_id]), None)
        if act is not None:
            act()
        step(self, loss)

    monkeypatch.setattr(Reporter, "step", hooked)

    def add(job_id: str, n: int, act: Callable[[], None]) -> None:
        hooks[(job_id, n)] = act

    return add


def test_compatible_jobs_train_as_one_pack_and_record_what_they_would_alone(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    packed = [submit(sessions, **trial) for trial in TRIALS]
    Worker(packing(settings), sessions, show_progress=False).run(max_jobs=3)
    alone = [submit(sessions, **trial) for trial in TRIALS]
    Worker(packing(settings, 1), sessions, show_progress=False).run(max_jobs=3)

    rows = [read_job(sessions, j) for j in packed]
    assert [r.status for r in rows] == [JobStatus.SUCCEEDED] * 3, [r.error for r in rows]
    assert len({(r.started_at, r.worker_id) for r in rows}) == 1  # one claim took all three
    solo = [read_job(sessions, j) for j in alone]
    assert len({r.started_at for r in solo}) == 3
    for job, reference in zip(rows, solo, strict=True):
        assert (job.step, job.epoch, job.attempt) == (STEPS, 2, 1)
        mine, theirs = losses(sessions, job.id), losses(sessions, reference.id)
        assert len(mine) == STEPS
        torch.testing.assert_close(
            torch.tensor(mine), torch.tensor(theirs), rtol=LOSS_RTOL, atol=LOSS_ATOL
        )
        assert job.checkpoint is not None and job.checkpoint != reference.checkpoint
    for job, reference in zip(rows, solo, strict=True):  # one test image apart, at most
        assert job.accuracy == pytest.approx(reference.accuracy, abs=1 / SMALL_TEST)


def test_jobs_a_pack_cannot_hold_train_alone_and_succeed(
    settings: Settings, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack that cannot be built (a worker's bug, a state from elsewhere) is not the jobs'
    fault: each trains alone, recording what a solo claim of it records."""

    def unpackable(*args: object, **kwargs: object) -> None:
        raise Unpackable("jobs in one pack must have taken as many steps, not {0, 3}")

    monkeypatch.setattr("workers.packed.train_packed", unpackable)
    packed = [submit(sessions, **trial) for trial in TRIALS[:2]]
    Worker(packing(settings), sessions, show_progress=False).run(max_jobs=2)
    monkeypatch.undo()
    alone = [submit(sessions, **trial) for trial in TRIALS[:2]]
    Worker(packing(settings, 1), sessions, show_progress=False).run(max_jobs=2)

    rows = [read_job(sessions, j) for j in packed]
    assert [r.status for r in rows] == [JobStatus.SUCCEEDED] * 2, [r.error for r in rows]
    assert len({r.started_at for r in rows}) == 1  # claimed as one pack
    for job, reference in zip(packed, alone, strict=True):
        assert losses(sessions, job) == losses(sessions, reference)  # the solo loop's bits


def test_jobs_that_cannot_share_a_step_are_not_packed_together(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    a = submit(sessions)
    other_batch = submit(sessions, batch_size=64)
    b = submit(sessions, seed=5)
    resuming = submit(sessions)
    with sessions.begin() as session:  # an earlier attempt's job that resumes after epoch 1
        session.execute(
            update(Job).where(Job.id == resuming).values(resume_epoch=1, resume_checkpoint="x")
        )
    worker = Worker(packing(settings), sessions, show_progress=False)
    assert [job.id for job in worker.claim_pack(4)] == [a, b]
    assert [job.id for job in worker.claim_pack(4)] == [other_batch]
    assert [job.id for job in worker.claim_pack(4)] == [resuming]
    assert worker.claim_pack(4) == []


def test_a_job_cancelled_mid_pack_ends_cancelled_alone(
    settings: Settings,
    sessions: sessionmaker[Session],
    at_step: Callable[[str, int, Callable[[], None]], None],
) -> None:
    ids = [submit(sessions, **trial) for trial in TRIALS]

    def cancel() -> None:
        with sessions.begin() as session:
            job = session.get(Job, ids[1])
            assert job is not None
            job_repo.request_cancel(session, job, now=utcnow())

    at_step(ids[1], 5, cancel)
    Worker(packing(settings), sessions, show_progress=False).run(max_jobs=3)
    cancelled = read_job(sessions, ids[1])
    assert cancelled.status == JobStatus.CANCELLED and 5 <= cancelled.step < STEPS
    for job_id in (ids[0], ids[2]):
        job = read_job(sessions, job_id)
        assert (job.status, job.step) == (JobStatus.SUCCEEDED, STEPS), job.error


def test_a_job_whose_lease_is_taken_mid_pack_is_lost_alone(
    settings: Settings,
    sessions: sessionmaker[Session],
    at_step: Callable[[str, int, Callable[[], None]], None],
) -> None:
    ids = [submit(sessions, **trial) for trial in TRIALS]
    taken: list[int] = []

    def take_over() -> None:  # another worker's claim: the attempt moves on
        with sessions.begin() as session:
            job = session.get(Job, ids[0])
            assert job is not None
            taken.append(job.step)
            job.attempt += 1
            job.worker_id = "another"

    at_step(ids[0], 7, take_over)
    Worker(packing(settings), sessions, show_progress=False).run(max_jobs=3)
    lost = read_job(sessions, ids[0])
    assert (lost.status, lost.attempt, lost.worker_id) == (JobStatus.RUNNING, 2, "another")
    assert lost.step == taken[0] and len(losses(sessions, ids[0])) == taken[0]  # nothing more
    for job_id in ids[1:]:
        job = read_job(sessions, job_id)
        assert (job.status, job.step) == (JobStatus.SUCCEEDED, STEPS), job.error


def test_a_stop_mid_pack_releases_every_job_and_they_resume_as_a_pack(
    settings: Settings,
    sessions: sessionmaker[Session],
    at_step: Callable[[str, int, Callable[[], None]], None],
) -> None:
    ids = [submit(sessions, **trial) for trial in TRIALS]
    stop = StopEvent()
    at_step(ids[2], 3, stop.set)
    Worker(packing(settings), sessions, stop=stop, show_progress=False).run()
    for job_id in ids:  # each finished the epoch it was in, and went back with it kept
        job = read_job(sessions, job_id)
        assert (job.status, job.attempt, job.worker_id) == (JobStatus.QUEUED, 1, None)
        assert job.max_attempts == 4  # one more: the attempt was not spent
        assert (job.resume_epoch, job.step) == (1, STEPS // 2)
    Worker(packing(settings), sessions, show_progress=False).run(max_jobs=3)
    rows = [read_job(sessions, j) for j in ids]
    assert len({r.started_at for r in rows}) == 1  # claimed again together
    alone = [submit(sessions, **trial) for trial in TRIALS]
    Worker(packing(settings, 1), sessions, show_progress=False).run(max_jobs=3)
    for job, reference in zip(rows, alone, strict=True):
        assert (job.status, job.step, job.attempt) == (JobStatus.SUCCEEDED, STEPS, 2), job.error
        torch.testing.assert_close(
            torch.tensor(losses(sessions, job.id)),
            torch.tensor(losses(sessions, reference)),
            rtol=LOSS_RTOL,
            atol=LOSS_ATOL,
        )


def test_a_packed_job_whose_state_cannot_be_used_starts_over_and_the_others_resume(
    settings: Settings,
    sessions: sessionmaker[Session],
    at_step: Callable[[str, int, Callable[[], None]], None],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One damaged state among a pack's: the pack's first setup failed on it, and every job of
    the pack ended failed for good."""
    resumed: list[str] = []
    resume_at = Reporter.resume_at

    def noted(self: Reporter, *args: Any) -> None:
        resumed.append(self.claim.job_id)
        resume_at(self, *args)

    monkeypatch.setattr(Reporter, "resume_at", noted)
    ids = [submit(sessions, **trial) for trial in TRIALS]
    stop = StopEvent()
    at_step(ids[2], 3, stop.set)
    Worker(packing(settings), sessions, stop=stop, show_progress=False).run()
    damaged = read_job(sessions, ids[1])
    assert damaged.status == JobStatus.QUEUED and damaged.resume_checkpoint is not None
    overwrite_artifact(settings, sessions, damaged.resume_checkpoint, bytes(100))
    with caplog.at_level("WARNING", logger="workers"):
        Worker(packing(settings), sessions, show_progress=False).run(max_jobs=3)
    for job_id in ids:
        job = read_job(sessions, job_id)
        assert (job.status, job.step, job.attempt) == (JobStatus.SUCCEEDED, STEPS, 2), job.error
        with sessions() as session:
            steps = metric_repo.read_steps(session, job_id, after_step=0, limit=10_000)
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert f"job {ids[1]}: " in caplog.text and "cannot be used" in caplog.text
    assert sorted(resumed) == sorted([ids[0], ids[2]])  # the others went on from their states


def test_with_pack_max_1_a_worker_takes_one_job_at_a_time(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    first, second = submit(sessions), submit(sessions, seed=9)
    Worker(packing(settings, 1), sessions, show_progress=False).run(max_jobs=1)
    assert read_job(sessions, first).status == JobStatus.SUCCEEDED
    assert (read_job(sessions, second).status, read_job(sessions, second).attempt) == (
        JobStatus.QUEUED,
        0,
    )


@pytest.fixture
def env(db_url: str, small_mnist: Path, tmp_path: Path) -> dict[str, str]:
    return local_env(
        db_url,
        small_mnist,
        tmp_path,
        pack_max="4",
        poll_interval_s="0.05",
        flush_interval_s="0.1",
        torch_threads="1",
    )


def test_two_packing_workers_never_claim_the_same_job(
    sessions: sessionmaker[Session], env: dict[str, str], tmp_path: Path
) -> None:
    ids = [submit(sessions, seed=i, epochs=1) for i in range(16)]
    log = tmp_path / "workers.log"
    with process(["-m", "workers", "--concurrency", "2"], env, log):
        wait_for(
            lambda: all(read_job(sessions, j).status == JobStatus.SUCCEEDED for j in ids),
            timeout_s=180,
            what="all sixteen jobs to succeed",
        )
    claims = Counter(re.findall(r"claimed job ([0-9a-f]{32}) attempt (\d+)", log.read_text()))
    assert set(claims) == {(j, "1") for j in ids}
    assert set(claims.values()) == {1}


def test_sigterm_mid_pack_releases_every_job_of_the_pack(
    sessions: sessionmaker[Session], medium_mnist: Path, db_url: str, tmp_path: Path
) -> None:
    env = local_env(db_url, medium_mnist, tmp_path, pack_max="4", flush_interval_s="0.1")
    body = {"epochs": 20, "batch_size": 8, "trainset_size": 8000, "testset_size": 200}
    ids = [queue_job(sessions, {**body, "seed": i}) for i in range(3)]
    with process(["-m", "workers"], env, tmp_path / "worker.log") as proc:
        wait_for(
            lambda: all(read_job(sessions, j).step > 0 for j in ids),
            timeout_s=120,
            what="the pack to train",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    for job_id in ids:  # each went back with the epoch it was in kept, its attempt not spent
        job = read_job(sessions, job_id)
        assert (job.status, job.attempt, job.worker_id) == (JobStatus.QUEUED, 1, None)
        assert job.max_attempts == 4
        assert job.resume_epoch >= 1 and job.step == job.resume_epoch * 1000
    assert "(a pack of 3)" in (tmp_path / "worker.log").read_text()


def test_when_the_timing_job_leaves_the_pack_another_times_its_steps(
    settings: Settings,
    sessions: sessionmaker[Session],
    at_step: Callable[[str, int, Callable[[], None]], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tuner = Counting(candidate_threads(2), probe_steps=3)
    monkeypatch.setattr("workers.worker.process_tuner", lambda: tuner)
    ids = [submit(sessions, **trial) for trial in TRIALS]

    def cancel_the_first() -> None:  # the pack's first job's reporter times its steps
        with sessions.begin() as session:
            job = session.get(Job, ids[0])
            assert job is not None
            job_repo.request_cancel(session, job, now=utcnow())

    at_step(ids[0], 5, cancel_the_first)
    threads_before = torch.get_num_threads()
    try:
        Worker(
            packing(settings.model_copy(update={"torch_threads": "auto"})),
            sessions,
            show_progress=False,
        ).run(max_jobs=3)
    finally:
        torch.set_num_threads(threads_before)
    assert read_job(sessions, ids[0]).status == JobStatus.CANCELLED
    assert [read_job(sessions, j).status for j in ids[1:]] == [JobStatus.SUCCEEDED] * 2
    # Every pack step but each epoch's first (which begins the timing) was told of, timed or
    # (beside the worker's writes) not: by the cancelled job's reporter, then by another's. Its
    # first call begins the timing again, unless the cancel was found at an epoch's end (the
    # next epoch's first step begins it).
    assert tuner.told.count("step") + tuner.told.count("beside writes") == STEPS - 2
    assert tuner.told.count("begin") in (2, 3)
