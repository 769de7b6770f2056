"""Flushes written behind the loop: training goes on during a write, and what the write finds
(a lost lease, a cancel) stops the job at the next step; steps a PostgreSQL crash may lose are
stored again by the next synchronous write."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar, cast

import pytest
import torch
from sqlalchemy import Engine, delete, update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import CancelRequested, LeaseLost
from service.ml import SimpleMLP
from service.status import JobStatus
from service.steps import StepPlan
from service.store import job_repo, queue_repo
from service.store.artifacts.backends import FolderArtifacts
from service.store.tables import Job, TrainStep
from service.store.upkeep.db_clock import database_time
from tests.jobs import queue_job, read_job
from tests.support import SMALL_TEST, SMALL_TRAIN, wait_for
from tests.workers.reporting.test_buffer import stored_steps
from tests.workers.reports import claimed_reporter
from workers.endings import Endings
from workers.reporting import Claim, Limits, Reporter
from workers.reporting.buffer import ProgressBuffer
from workers.reporting.writers import Activity, Writers
from workers.resume import TrainingState
from workers.tuning.threads import ThreadTuner

T = TypeVar("T")

PARAMS = {"epochs": 2, "batch_size": 64, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}


class GatedDatabase:
    """Sessions whose writes wait at ``gate`` (opened by the test), noting when one does."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.writers: list[str] = []

    @contextmanager
    def begin(self) -> Iterator[Session]:
        self.writers.append(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        with self.sessions.begin() as session:
            yield session


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reporter_on(
    sessions: sessionmaker[Session],
    writes: object,
    tmp_path: Path,
    clock: Clock,
    writers: Writers | None = None,
) -> tuple[Reporter, str]:
    return claimed_reporter(
        sessions,
        PARAMS,
        writes=cast(sessionmaker[Session], writes),
        checkpoint_dir=tmp_path,
        limits=Limits(lease_s=30, flush_interval_s=1.0),
        clock=clock,
        writers=writers,
    )


def test_a_due_flush_is_written_by_another_thread_while_training_goes_on(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    db, clock = GatedDatabase(sessions), Clock()
    reporter, job_id = reporter_on(sessions, db, tmp_path, clock)
    for _ in range(3):
        reporter.step(torch.tensor(1.0))
    clock.now = 2.0  # the flush is due: the 4th step hands the 4 steps over
    reporter.step(torch.tensor(1.0))
    assert db.entered.wait(timeout=30)  # the write waits at the gate...
    for _ in range(5):  # ...and the loop does not
        reporter.step(torch.tensor(0.5))
    assert read_job(sessions, job_id).step == 0
    db.gate.set()
    wait_for(
        lambda: stored_steps(sessions, job_id) == [1, 2, 3, 4] or None,
        timeout_s=30,
        what="the write behind the loop",
    )
    assert db.writers and all(name.startswith("flush") for name in db.writers)
    reporter.drain()
    assert stored_steps(sessions, job_id) == list(range(1, 10))
    reporter.close()


def test_an_epoch_ended_during_a_write_goes_with_the_next_one_without_waiting(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An epoch's end does not wait for the write in flight (another process holding SQLite's
    write lock held training for the whole lock, an epoch at a time); its row goes with the
    write handed over at the first step after that one ends. Its log line gives its own last
    step's loss, written or not (it gave the last written, or nan)."""
    db, clock = GatedDatabase(sessions), Clock()
    reporter, job_id = reporter_on(sessions, db, tmp_path, clock)
    reporter.step(torch.tensor(1.0))
    clock.now = 2.0
    reporter.step(torch.tensor(0.25))  # steps 1–2 handed over: the write waits at the gate
    assert db.entered.wait(timeout=30)
    model = SimpleMLP()
    state = TrainingState(model, torch.optim.Adam(model.parameters()), torch.Generator())
    with caplog.at_level(logging.INFO, logger="workers"):
        reporter.epoch(1, 0.5, state)  # returns with the gate still shut
    assert "epoch 1/2: loss 0.2500, test accuracy 0.5000" in caplog.text
    reporter.step(torch.tensor(0.5))  # the write is still in flight: nothing more handed over
    assert read_job(sessions, job_id).epoch == 0
    db.gate.set()
    wait_for(
        lambda: stored_steps(sessions, job_id) == [1, 2] or None, timeout_s=30, what="the write"
    )
    reporter.step(torch.tensor(0.5))  # that write has ended: the epoch's goes at once
    wait_for(lambda: read_job(sessions, job_id).epoch == 1 or None, timeout_s=30, what="the epoch")
    assert stored_steps(sessions, job_id) == [1, 2, 3, 4]
    reporter.drain()
    reporter.close()


class Told(ThreadTuner):
    """A tuner that notes, for each step it is told of, whether it ran beside a write."""

    def __init__(self) -> None:
        super().__init__((1,))
        self.beside: list[bool] = []

    def step(self, *, beside_writes: bool = False) -> None:
        self.beside.append(beside_writes)
        super().step(beside_writes=beside_writes)


def test_the_tuner_is_told_which_steps_ran_beside_a_write(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    db, clock, tuner, writers = GatedDatabase(sessions), Clock(), Told(), Writers()
    reporter, _ = reporter_on(sessions, db, tmp_path, clock, writers)
    reporter.time_steps_for(tuner)
    for _ in range(3):  # the first begins the timing; two quiet steps
        reporter.step(torch.tensor(1.0))
    clock.now = 2.0  # due: this step hands a write over, which runs during the next ones
    reporter.step(torch.tensor(1.0))
    assert db.entered.wait(timeout=30)
    for _ in range(3):
        reporter.step(torch.tensor(1.0))
    db.gate.set()
    activity = writers.activity
    wait_for(lambda: activity.quiet_since(activity.mark()), timeout_s=30, what="the write")
    for _ in range(3):  # the first ran while the write ended; then quiet again
        reporter.step(torch.tensor(1.0))
    assert tuner.beside == [False, False, False, True, True, True, True, False, False]
    reporter.drain()
    reporter.close()
    writers.shutdown()


def test_activity_says_whether_a_write_ran_at_any_moment_since_a_mark() -> None:
    activity, started, release = Activity(), threading.Event(), threading.Event()
    mark = activity.mark()
    assert activity.quiet_since(mark)
    with ThreadPoolExecutor(max_workers=1) as pool:

        def write() -> bool:
            started.set()
            return release.wait(30)

        running = pool.submit(activity.run, write)
        assert started.wait(30)
        assert not activity.quiet_since(mark)  # began after the mark
        during = activity.mark()
        assert not activity.quiet_since(during)  # still running
        release.set()
        assert running.result(timeout=30) is True
    assert not activity.quiet_since(during)  # it ended after the mark: it ran since
    assert activity.quiet_since(activity.mark())


def test_the_writers_tasks_count_as_writes() -> None:
    writers = Writers()
    mark = writers.activity.mark()
    assert writers.flushes.submit(lambda: 7).result(timeout=30) == 7
    assert not writers.activity.quiet_since(mark)
    mark = writers.activity.mark()
    assert writers.states.submit(lambda: 8).result(timeout=30) == 8
    assert not writers.activity.quiet_since(mark)
    writers.shutdown()


def test_a_lease_lost_found_behind_the_loop_stops_it_at_a_next_step(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    clock = Clock()
    reporter, job_id = reporter_on(sessions, sessions, tmp_path, clock)
    with sessions.begin() as session:  # the lease ran out and another worker took the job
        session.execute(update(Job).values(lease_expires_at=database_time(-1)))
        job = queue_repo.claim_job(session, worker_id="w2", lease_s=30, device="cpu", now=utcnow())
        assert job is not None
    reporter.step(torch.tensor(1.0))
    clock.now = 2.0
    with pytest.raises(LeaseLost):
        wait_for(lambda: reporter.step(torch.tensor(1.0)), timeout_s=30, what="LeaseLost")
    assert stored_steps(sessions, job_id) == []
    reporter.close()


def test_a_cancel_found_behind_the_loop_stops_it_at_a_next_step(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    clock = Clock()
    reporter, job_id = reporter_on(sessions, sessions, tmp_path, clock)
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job_repo.request_cancel(session, job, now=utcnow())
    reporter.step(torch.tensor(1.0))
    clock.now = 2.0
    with pytest.raises(CancelRequested):
        wait_for(lambda: reporter.step(torch.tensor(1.0)), timeout_s=30, what="the cancel")
    reporter.close()


def lose_commits_after(sessions: sessionmaker[Session], job_id: str, *, step: int) -> None:
    """What a crash of the PostgreSQL server leaves of commits that did not wait for the disk."""
    with sessions.begin() as session:
        session.execute(delete(TrainStep).where(TrainStep.job_id == job_id, TrainStep.step > step))
        session.execute(update(Job).where(Job.id == job_id).values(step=step))


def test_steps_a_postgresql_crash_lost_are_stored_again_by_the_epochs_write(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite's commits never skip the wait for the disk: nothing to store again")
    job_id = queue_job(sessions, PARAMS)
    with sessions.begin() as session:
        job = queue_repo.claim_job(session, worker_id="w", lease_s=30, device="cpu", now=utcnow())
        assert job is not None and job.id == job_id
    buffer = ProgressBuffer(
        claim=Claim(job_id, 1, "w"), plan=StepPlan.of(job), sessions=sessions, lease_s=30
    )
    for _ in range(3):
        buffer.add_step(torch.tensor(1.0))
    buffer.flush()  # steps only: committed without waiting for the disk
    for _ in range(2):
        buffer.add_step(torch.tensor(1.0))
    buffer.flush()
    lose_commits_after(sessions, job_id, step=3)  # the server crashed: the second was lost
    buffer.add_step(torch.tensor(1.0))
    buffer.add_epoch(1, 0.5)
    buffer.flush()  # the epoch's write waits for the disk, and stores steps 4 and 5 again
    assert stored_steps(sessions, job_id) == [1, 2, 3, 4, 5, 6]
    with sessions.begin() as session:  # after a synchronous write nothing is carried
        session.execute(delete(TrainStep).where(TrainStep.job_id == job_id, TrainStep.step > 5))
    buffer.add_step(torch.tensor(1.0))
    buffer.add_epoch(2, 0.6)
    buffer.flush()
    assert stored_steps(sessions, job_id) == [1, 2, 3, 4, 5, 7]


class ThreadNoting:
    """Sessions that note which thread begins each write."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.threads: set[int] = set()

    @contextmanager
    def begin(self) -> Iterator[Session]:
        self.threads.add(threading.get_ident())
        with self.sessions.begin() as session:
            yield session


def test_the_jobs_of_a_pack_write_through_the_workers_two_threads(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    db, clock, writers = ThreadNoting(sessions), Clock(), Writers()
    reporters = [reporter_on(sessions, db, tmp_path, clock, writers) for _ in range(3)]
    for round_ in range(1, 4):
        clock.now = 2.0 * round_  # a flush due for every job at once, as in a pack
        for reporter, _ in reporters:
            reporter.step(torch.tensor(1.0))
    first, first_id = reporters[0]
    first.drain()
    first.close()  # one job ends: the others' writes go on through the same threads
    for reporter, _ in reporters[1:]:
        reporter.step(torch.tensor(0.5))
        reporter.drain()
    assert all(stored_steps(sessions, job_id) for _, job_id in reporters[1:])
    assert stored_steps(sessions, first_id) == [1, 2, 3]
    # Every write behind the loop ran on one thread (drain writes on the caller's).
    assert len(db.threads - {threading.get_ident()}) == 1
    for reporter, _ in reporters[1:]:
        reporter.close()
    assert writers.flushes.submit(int).result(timeout=30) == 0  # still running
    writers.shutdown()


def retry(op: Callable[[], T], what: str, *, within_s: float | None = None) -> T:
    return op()


def test_steps_a_postgresql_crash_lost_are_stored_again_by_a_cancelled_jobs_end(
    sessions: sessionmaker[Session], engine: Engine, tmp_path: Path
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite's commits never skip the wait for the disk: nothing to store again")
    reporter, job_id = claimed_reporter(
        sessions,
        PARAMS,
        writes=sessions,
        checkpoint_dir=tmp_path,
        limits=Limits(lease_s=30, flush_interval_s=3600),
    )
    for _ in range(3):
        reporter.step(torch.tensor(1.0))
    reporter.flush()  # steps only: committed without waiting for the disk
    for _ in range(2):
        reporter.step(torch.tensor(1.0))
    reporter.flush()
    lose_commits_after(sessions, job_id, step=3)  # the server crashed: the second was lost
    endings = Endings(sessions, FolderArtifacts(tmp_path), retry, shutdown_grace_s=5)
    outcome = endings.finish(Claim(job_id, 1, "w"), JobStatus.CANCELLED, reporter)
    reporter.close()
    assert outcome.status == JobStatus.CANCELLED
    assert stored_steps(sessions, job_id) == [1, 2, 3, 4, 5]
    job = read_job(sessions, job_id)
    assert job.status == JobStatus.CANCELLED and job.step == 5
