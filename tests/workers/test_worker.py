"""A worker in this process against a real migrated database (both backends)."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import CancelRequested
from service.schemas import JobCreate
from service.settings import Settings
from service.status import JobStatus
from service.store import job_repo, metric_repo, queue_repo, worker_repo
from service.store.artifacts.backends import ArtifactSource
from service.store.engines import make_sessionmaker
from service.store.tables import Job
from service.store.wakeups import StopEvent
from tests.jobs import queue_job, read_job
from tests.records import lapse_leases
from tests.support import SMALL_TEST, SMALL_TRAIN, overwrite_artifact, stored, wait_for
from tests.workers.flaky import FlakyDatabase
from workers import worker as worker_module
from workers.host import pid_space
from workers.reporting import Claim, Diverged, Limits, Reporter, Shutdown
from workers.worker import Worker


def submit(sessions: sessionmaker[Session], **params: int | float) -> str:
    defaults = {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 2}
    return queue_job(sessions, {**defaults, **params})


read = read_job


def test_a_job_trains_and_records_every_step_and_epoch(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = submit(sessions, batch_size=50)
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)

    job = read(sessions, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.total_steps == 2 * 13 and job.step == job.total_steps and job.epoch == 2
    assert job.device == "cpu" and job.attempt == 1 and job.finished_at is not None
    with sessions() as session:
        steps = metric_repo.read_steps(session, job_id, after_step=0, limit=10_000)
        epochs = metric_repo.read_epochs(session, job_id)
    assert [s["step"] for s in steps] == list(range(1, 27))
    assert [s["epoch"] for s in steps] == [1] * 13 + [2] * 13
    assert steps[0]["examples_seen"] == 50 and steps[12]["examples_seen"] == SMALL_TRAIN
    assert steps[-1]["examples_seen"] == 2 * SMALL_TRAIN
    assert [(e["epoch"], e["examples_seen"]) for e in epochs] == [(1, 640), (2, 1280)]
    assert job.accuracy == epochs[-1]["accuracy"] > 0.9
    assert stored(settings, sessions, job.checkpoint)


def test_a_ready_worker_leaves_what_it_loaded_out_of_full_collections(
    settings: Settings, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc.freeze once ready: a full collection walking torch's and the data's objects paused
    one job in five by ~300 ms (docs/benchmarks.md)."""
    order: list[str] = []
    monkeypatch.setattr("workers.worker.gc.freeze", lambda: order.append("freeze"))
    monkeypatch.setattr("workers.worker.preload_mnist", lambda *a, **k: order.append("preload"))
    Worker(settings, sessions, show_progress=False).run(max_jobs=0)
    assert order == ["preload", "freeze"]


def test_a_failing_job_is_marked_failed_and_the_worker_goes_on(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    bad = submit(sessions, trainset_size=60_000)
    good = submit(sessions, epochs=1)
    Worker(settings, sessions, show_progress=False).run(max_jobs=2)
    failed = read(sessions, bad)
    assert failed.status == JobStatus.FAILED
    assert failed.error == "trainset_size is 60000 but the data set holds only 640 images"
    assert read(sessions, good).status == JobStatus.SUCCEEDED


def test_same_seed_gives_the_same_recorded_losses(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    ids = [submit(sessions, seed=123, epochs=1) for _ in range(2)]
    Worker(settings, sessions, show_progress=False).run(max_jobs=2)
    with sessions() as session:
        a, b = (
            [s["loss"] for s in metric_repo.read_steps(session, i, after_step=0, limit=100)]
            for i in ids
        )
    assert len(a) == 10 and a == b


def test_a_running_job_stops_when_cancelled(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = submit(sessions, epochs=100, batch_size=8)
    worker = Worker(settings, sessions, show_progress=False)
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    wait_for(lambda: read(sessions, job_id).step > 0, timeout_s=60, what="training to start")
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job_repo.request_cancel(session, job, now=utcnow())
    thread.join(timeout=30)
    assert not thread.is_alive()
    job = read(sessions, job_id)
    assert job.status == JobStatus.CANCELLED
    assert job.step < job.total_steps


def test_a_stopping_worker_hands_its_job_back(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = submit(sessions, epochs=100, batch_size=8)
    stop = StopEvent()
    worker = Worker(settings, sessions, stop=stop, show_progress=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_for(lambda: read(sessions, job_id).step > 0, timeout_s=60, what="training to start")
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    job = read(sessions, job_id)
    assert (job.status, job.attempt, job.worker_id) == (JobStatus.QUEUED, 1, None)
    assert job.max_attempts == 4  # the attempt was not spent: one more
    # It finished the epoch it was in, so a later attempt resumes after it.
    assert job.resume_epoch >= 1 and job.step == job.resume_epoch * 80
    assert stored(settings, sessions, job.resume_checkpoint)


def saved_after_another_epoch(state: bytes) -> bytes:
    saved = torch.load(io.BytesIO(state), weights_only=True)
    out = io.BytesIO()
    torch.save({**saved, "epoch": saved["epoch"] + 5}, out)
    return out.getvalue()


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: bytes(100),  # overwritten
        lambda state: state[: len(state) // 2],  # truncated
        saved_after_another_epoch,  # a state, but not of the epoch the row names
    ],
    ids=["zeros", "truncated", "another-epoch"],
)
def test_a_job_whose_training_state_cannot_be_used_starts_over_and_succeeds(
    settings: Settings,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes], bytes],
) -> None:
    """As where the state is missing: it failed the job for good (UnpicklingError), and
    deleted the state, so nothing was left to tell why."""
    job_id = submit(sessions, epochs=20, batch_size=8)  # many epochs left when it stops
    stop = StopEvent()
    worker = Worker(settings, sessions, stop=stop, show_progress=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_for(lambda: read(sessions, job_id).resume_epoch >= 1, timeout_s=60, what="a state")
    stop.set()
    thread.join(timeout=60)
    job = read(sessions, job_id)
    assert job.status == JobStatus.QUEUED and job.resume_checkpoint is not None
    source = ArtifactSource(settings.checkpoint_dir, sessions).open(job.resume_checkpoint)
    assert source is not None
    state = source.read_bytes() if isinstance(source, Path) else source.getvalue()
    overwrite_artifact(settings, sessions, job.resume_checkpoint, damage(state))

    with caplog.at_level("WARNING", logger="workers"):
        Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    job = read(sessions, job_id)
    assert (job.status, job.attempt, job.error) == (JobStatus.SUCCEEDED, 2, None)
    assert "cannot be used" in caplog.text and "starting over" in caplog.text
    with sessions() as session:
        steps = metric_repo.read_steps(session, job_id, after_step=0, limit=10_000)
    assert [s["step"] for s in steps] == list(range(1, job.total_steps + 1))


def make_reporter(
    sessions: sessionmaker[Session], tmp_path: Path, stop: threading.Event | None = None
) -> tuple[Reporter, str]:
    job_id = submit(sessions, epochs=1, batch_size=64)
    with sessions.begin() as session:
        job = queue_repo.claim_job(session, worker_id="w", lease_s=30, device="cpu", now=utcnow())
        assert job is not None
    reporter = Reporter(
        claim=Claim(job_id, 1, "w"),
        params=JobCreate(epochs=1, batch_size=64, trainset_size=SMALL_TRAIN),
        sessions=sessions,
        limits=Limits(lease_s=30, flush_interval_s=3600, shutdown_grace_s=0.0),
        stop=stop or threading.Event(),
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    return reporter, job_id


def test_the_reporter_refuses_a_non_finite_loss(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    reporter, _ = make_reporter(sessions, tmp_path)
    reporter.step(torch.tensor(2.3))
    reporter.step(torch.tensor(float("nan")))
    with pytest.raises(Diverged, match="loss is nan at step 2"):
        reporter.flush()


def test_the_reporter_writes_only_at_flushes(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    reporter, job_id = make_reporter(sessions, tmp_path)
    for _ in range(5):
        reporter.step(torch.tensor(1.0))
    assert read(sessions, job_id).step == 0  # buffered, nothing written yet
    reporter.flush()
    assert read(sessions, job_id).step == 5


def test_the_reporter_raises_on_cancel_and_on_shutdown(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    stop = threading.Event()
    reporter, job_id = make_reporter(sessions, tmp_path, stop)
    stop.set()
    with pytest.raises(Shutdown):
        reporter.flush()
    stop.clear()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job_repo.request_cancel(session, job, now=utcnow())
    with pytest.raises(CancelRequested):
        reporter.flush()


def test_a_job_past_its_runtime_limit_fails_with_the_reason(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = submit(sessions, epochs=100, batch_size=8, max_runtime_s=0.3)
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    job = read(sessions, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == "the job ran longer than its max_runtime_s of 0.3 s"
    assert 0 < job.step < job.total_steps


def test_a_starting_worker_recovers_the_jobs_of_dead_workers_of_its_pid_space(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """Only its own pid space's: a worker of the same hostname in another PID namespace (a
    container on the host's network) was taken for dead, its pid not running here, and its
    live job handed on."""
    job_id, neighbours = submit(sessions, epochs=1), submit(sessions, epochs=1)
    dead_pid = int(subprocess.check_output(["sh", "-c", "echo $$"]).strip())  # exited already
    now = utcnow()
    for worker_id, space, job in (("ghost", pid_space(), job_id), ("box", "other", neighbours)):
        with sessions.begin() as session:
            worker_repo.register_worker(
                session,
                worker_id=worker_id,
                host=socket.gethostname(),
                pid=dead_pid,
                device="cpu",
                now=now,
                pid_space=space,
            )
        with sessions.begin() as session:
            claimed = queue_repo.claim_job(
                session, worker_id=worker_id, lease_s=3600, device="cpu", now=now
            )
            assert claimed is not None and claimed.id == job

    worker = Worker(settings, sessions, show_progress=False)
    worker.register()  # long before the ghost's hour-long lease ends
    retried = worker.claim()
    assert retried is not None and (retried.id, retried.attempt) == (job_id, 2)
    assert worker.claim() is None  # the other namespace's job is left to its worker
    assert (read(sessions, neighbours).worker_id, read(sessions, neighbours).attempt) == ("box", 1)
    with sessions() as session:
        live = [row.id for row, _ in worker_repo.live_workers(session, lease_s=30)]
        assert sorted(live) == sorted(["box", worker.worker_id])


def unwritable_checkpoints(settings: Settings, tmp_path: Path) -> Settings:
    """The settings with a checkpoint folder that cannot be made: its parent is a file (a
    folder's mode would not stop root); artifacts written to it."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    return settings.model_copy(update={"checkpoint_dir": blocker / "models", "artifacts": "folder"})


def test_a_checkpoint_that_cannot_be_written_is_retried_as_the_next_attempt(
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = unwritable_checkpoints(settings, tmp_path)
    job_id = submit(sessions, epochs=1, batch_size=64)
    with caplog.at_level("ERROR", logger="workers"):
        Worker(broken, sessions, show_progress=False).run(max_jobs=1)
    job = read(sessions, job_id)
    assert (job.status, job.attempt, job.worker_id) == (JobStatus.QUEUED, 1, None)
    assert job.error == "could not write the checkpoint; retrying"  # no path, no advice
    assert str(broken.checkpoint_dir) in caplog.text  # the operator's log has the detail

    # The host's fault spends none of the job's attempts: it failed for good once two more
    # workers met the folder (its 3 attempts spent in seconds by a fault of seconds).
    for _ in range(2):
        Worker(broken, sessions, show_progress=False).run(max_jobs=1)
    job = read(sessions, job_id)
    assert (job.status, job.attempt, job.max_attempts) == (JobStatus.QUEUED, 3, 3 + 3)
    assert job.error == "could not write the checkpoint; retrying"
    with sessions() as session:
        assert worker_repo.live_workers(session, lease_s=30) == []
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)  # the folder is back
    job = read(sessions, job_id)
    assert (job.status, job.attempt, job.error) == (JobStatus.SUCCEEDED, 4, None)


def test_a_worker_that_cannot_read_mnist_hands_its_job_back_for_a_worker_that_can(
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One worker with a wrong MNIST_DATA_DIR (or no network to download) failed every job it
    claimed, a queue drained into ``failed`` within seconds, while it reported healthy."""
    job_id = submit(sessions, epochs=1, batch_size=64)
    nowhere = settings.model_copy(update={"data_dir": tmp_path / "nowhere", "download": False})
    with caplog.at_level("ERROR", logger="workers"):
        Worker(nowhere, sessions, show_progress=False).run(max_jobs=1)
    job = read(sessions, job_id)
    assert (job.status, job.attempt) == (JobStatus.QUEUED, 1)
    assert job.error == "the worker's host could not read the MNIST data; retrying"  # no path
    assert "MNIST not found under" in caplog.text  # the operator's log says where it looked
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    assert read(sessions, job_id).status == JobStatus.SUCCEEDED


def test_a_worker_waits_longer_before_each_claim_after_its_host_faults(
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It claimed the job straight back: a folder away for 3 s spent all 3 attempts in 2 s.
    Its pauses are recorded, not slept: each with the attempt the job was then at."""
    job_id = submit(sessions, epochs=1, batch_size=64)
    worker = Worker(unwritable_checkpoints(settings, tmp_path), sessions, show_progress=False)
    pauses: list[tuple[float, int]] = []
    monkeypatch.setattr(
        worker, "_pause", lambda s: pauses.append((s, read(sessions, job_id).attempt))
    )
    worker.run(max_jobs=3)
    assert (read(sessions, job_id).status, read(sessions, job_id).attempt) == (JobStatus.QUEUED, 3)
    first = worker_module.HOST_FAULT_FIRST_S
    assert pauses == [(first, 1), (2 * first, 2)]  # before the 2nd and 3rd claims; not after

    # A stop during the pause: no claim after it.
    again = submit(sessions, epochs=1, batch_size=64)
    stopping = Worker(unwritable_checkpoints(settings, tmp_path), sessions, show_progress=False)
    monkeypatch.setattr(stopping, "_pause", lambda _seconds: stopping.stop.set())
    stopping.run(max_jobs=3)
    assert (read(sessions, again).status, read(sessions, again).attempt) == (JobStatus.QUEUED, 1)


def test_an_idle_worker_pauses_once_after_a_host_fault_not_before_every_look(
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its count of faults in a row was reset only by a job it ran: idle after handing its
    job back, it logged "pausing 2 s … this host's fault" and paused before every look at the
    queue, for good, its host fine again. Pauses are recorded, not slept."""
    job_id = submit(sessions, epochs=1, batch_size=64)
    worker = Worker(unwritable_checkpoints(settings, tmp_path), sessions, show_progress=False)
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # meanwhile another worker takes the job
        pauses.append(seconds)
        with sessions.begin() as session:
            queue_repo.claim_job(
                session, worker_id="other", lease_s=3600, device="cpu", now=utcnow()
            )

    looks: list[int] = []
    claim = worker._claim

    def counted(size: int) -> list[Job]:
        jobs = claim(size)
        looks.append(len(jobs))
        if looks.count(0) == 3:
            worker.stop.set()
        return jobs

    monkeypatch.setattr(worker, "_pause", pause)
    monkeypatch.setattr(worker, "_claim", counted)
    worker.run()
    assert looks == [1, 0, 0, 0]
    assert pauses == [worker_module.HOST_FAULT_FIRST_S]  # once, not before each empty look
    assert read(sessions, job_id).worker_id == "other"


def test_a_resume_state_that_cannot_be_written_resumes_on_a_healthy_worker(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = submit(sessions, epochs=2, batch_size=64)
    Worker(unwritable_checkpoints(settings, tmp_path), sessions, show_progress=False).run(
        max_jobs=1
    )
    job = read(sessions, job_id)
    assert (job.status, job.error) == (
        JobStatus.QUEUED,
        "could not write the training state; retrying",
    )
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    job = read(sessions, job_id)
    assert (job.status, job.attempt, job.error) == (JobStatus.SUCCEEDED, 2, None)
    with sessions() as session:
        steps = metric_repo.read_steps(session, job_id, after_step=0, limit=10_000)
    assert [s["step"] for s in steps] == list(range(1, job.total_steps + 1))
    assert list(settings.checkpoint_dir.glob("*.resume.pt")) == []


def test_a_worker_asked_to_stop_while_the_database_is_down_stops_within_its_grace(
    settings: Settings, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    db = FlakyDatabase(sessions)
    stop = StopEvent()
    worker = Worker(
        settings.model_copy(update={"shutdown_grace_s": 0.5}), db.sessionmaker(), stop=stop
    )
    thread = threading.Thread(target=worker.run)
    with caplog.at_level("INFO", logger="workers"):
        thread.start()
        wait_for(lambda: db.tries > 0, timeout_s=30, what="the worker to start")
        db.down = True
        wait_for(lambda: worker.outage.down, timeout_s=30, what="the worker to meet the outage")
        tries = db.tries
        wait_for(lambda: db.tries > tries + 2, timeout_s=30, what="retries")  # it keeps trying
        assert thread.is_alive()
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert db.tries < 100  # backoff, not a busy loop
    assert "the database did not hear of it" in caplog.text
    assert caplog.text.count("database unreachable") == 1


@contextmanager
def serving(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[Worker]:
    """A worker serving the queue on a thread until the block ends."""
    worker = Worker(settings, sessions, show_progress=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop"


def succeeds(sessions: sessionmaker[Session], job_id: str, *, within_s: float = 20) -> None:
    wait_for(
        lambda: read(sessions, job_id).status == JobStatus.SUCCEEDED,
        timeout_s=within_s,
        what=f"job {job_id} to succeed",
    )


# An idle worker polls every 30 s here: a job done within 20 s was claimed on a wake-up.
LONG_POLL = {"poll_interval_s": 30.0}


def test_an_idle_worker_is_woken_by_a_queued_job(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with serving(settings.model_copy(update=LONG_POLL), sessions):
        # The first job may meet the worker's first look; the second comes once it is idle.
        for _ in range(2):
            succeeds(sessions, submit(sessions, epochs=1))


def test_a_worker_claims_the_next_job_as_soon_as_one_ends(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    jobs = [submit(sessions, epochs=1) for _ in range(3)]
    off = settings.model_copy(update={**LONG_POLL, "wakeups": False})
    with serving(off, sessions):  # no wake-ups, and no sleep between jobs either
        for job_id in jobs:
            succeeds(sessions, job_id)


def test_a_lost_wake_up_costs_a_poll_interval_not_the_job(
    settings: Settings, sessions: sessionmaker[Session], engine: Engine
) -> None:
    silent = make_sessionmaker(engine)  # its transactions publish nothing: every wake-up lost
    with serving(settings.model_copy(update={"poll_interval_s": 0.3}), sessions):
        succeeds(silent, submit(silent, epochs=1))


def test_with_wake_ups_off_an_idle_worker_polls(
    settings: Settings, sessions: sessionmaker[Session], db_url: str
) -> None:
    off = settings.model_copy(update={"wakeups": False, "poll_interval_s": 0.3})
    with serving(off, sessions):
        succeeds(sessions, submit(sessions, epochs=1))
    if db_url.startswith("sqlite"):
        assert not Path(db_url.removeprefix("sqlite:///") + ".wake").exists()


def lost_and_cancelled(sessions: sessionmaker[Session], settings: Settings) -> str:
    """A job whose worker vanished a lease ago, with a cancel asked: a settle ends it."""
    job_id = submit(sessions)
    then = utcnow() - timedelta(seconds=2 * settings.lease_s)
    with sessions.begin() as session:
        job = queue_repo.claim_job(
            session, worker_id="lost", lease_s=settings.lease_s, device="cpu", now=then
        )
        assert job is not None and job.id == job_id
        job_repo.request_cancel(session, job, now=then)
    lapse_leases(sessions, job_id)
    return job_id


def test_a_worker_settles_lost_leases_once_per_poll_interval(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    worker = Worker(settings.model_copy(update=LONG_POLL), sessions, show_progress=False)
    first = lost_and_cancelled(sessions, settings)
    assert worker.claim() is None  # its first claim settles
    assert read(sessions, first).status == JobStatus.CANCELLED
    second = lost_and_cancelled(sessions, settings)
    assert worker.claim() is None  # within the poll interval: no settle
    assert read(sessions, second).status == JobStatus.RUNNING
    often = Worker(settings.model_copy(update={"poll_interval_s": 0.001}), sessions)
    assert often.claim() is None
    assert read(sessions, second).status == JobStatus.CANCELLED


def test_a_claim_logs_how_long_a_first_attempt_waited_since_it_was_created(
    settings: Settings, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    job_id = queue_job(sessions, {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST})
    created = utcnow() - timedelta(seconds=2)
    with sessions.begin() as session:
        session.get_one(Job, job_id).created_at = created
    worker = Worker(settings, sessions, show_progress=False)
    with caplog.at_level("INFO", logger="workers"):
        job = worker.claim()
        claimed = utcnow()
    assert job is not None and job.id == job_id
    match = re.search(
        rf"claimed job {job_id} attempt 1, ([\d.]+) ms after it was created", caplog.text
    )
    assert match is not None, caplog.text
    assert 2000 <= float(match[1]) <= (claimed - created).total_seconds() * 1000 + 0.1

    caplog.clear()  # a retry waited since its previous attempt ended, not since it was created
    with sessions.begin() as session:
        row = session.get_one(Job, job_id)
        row.status, row.lease_expires_at = JobStatus.QUEUED, None
    with caplog.at_level("INFO", logger="workers"):
        again = worker.claim()
    assert again is not None and again.attempt == 2
    assert f"claimed job {job_id} attempt 2" in caplog.text
    assert "after it was created" not in caplog.text
