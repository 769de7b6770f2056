"""The queue cap of job submissions (``MNIST_MAX_QUEUED_JOBS``), on both backends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from service.domain import jobs
from service.errors import InvalidInput, TooManyRequests
from service.schemas import JobCreate
from service.store import metric_repo
from service.store.engines import make_sessionmaker
from service.store.tables import Job
from tests.records import PARAMS, FakeTraining, lapse_leases

CAP = 4
SUBMITTERS = 10


def test_submissions_at_once_never_pass_the_cap(sessions: sessionmaker[Session]) -> None:
    """Each submission counts the queue and inserts in one transaction; on PostgreSQL two that
    counted at once both passed the cap (12 answers of 12 queued where 5 were allowed)."""
    start = threading.Barrier(SUBMITTERS)

    def submit() -> bool:
        start.wait(timeout=30)
        with sessions() as session:
            try:
                jobs.submit(session, JobCreate(), max_attempts=1, max_queued=CAP, max_steps=10**6)
            except TooManyRequests:
                return False
        return True

    with ThreadPoolExecutor(SUBMITTERS) as pool:
        queued = list(pool.map(lambda _: submit(), range(SUBMITTERS)))
    assert queued.count(True) == CAP
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == CAP


def test_more_jobs_at_once_than_the_queue_holds_are_refused_for_good(
    sessions: sessionmaker[Session],
) -> None:
    """Not 429 (try again later): no wait makes room for them."""
    with sessions() as session, pytest.raises(InvalidInput) as caught:
        jobs.check_queue_room(session, adding=CAP + 1, max_queued=CAP)
    assert "at most 4 (MNIST_MAX_QUEUED_JOBS)" in caught.value.message
    with sessions() as session:
        jobs.check_queue_room(session, adding=CAP, max_queued=CAP)  # exactly the cap: room


def test_a_page_is_named_by_the_run_its_steps_are_of_whatever_commits_between_its_reads(
    engine: Engine, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL each statement of a read sees what committed before it: a retry's claim
    that landed between the attempt's read and the steps' labelled the new run's steps with
    the old run's attempt, and a reader paging on kept them as the old run's."""
    training = FakeTraining(sessions, PARAMS)
    training.submit()
    training.claim()
    training.advance(3)
    read_steps = metric_repo.read_steps

    def retried_meanwhile(*args: Any, **kwargs: Any) -> Any:
        lapse_leases(sessions)  # its worker died; another claims the job and trains anew
        training.worker_id = "second"
        training.claim()
        training.advance(2)
        return read_steps(*args, **kwargs)

    monkeypatch.setattr(metric_repo, "read_steps", retried_meanwhile)
    with make_sessionmaker(engine, read_only=True)() as db:  # as the API reads a page
        page = jobs.metrics_page(db, training.job_id, after_step=0, limit=100)
    assert page is not None
    steps = [s["step"] for s in page["steps"]]
    assert page["attempt"] == (2 if steps == [1, 2] else 1)  # the run the steps are of


def _three_epochs(sessions: sessionmaker[Session]) -> FakeTraining:
    params = PARAMS.model_copy(update={"trainset_size": 640, "batch_size": 64, "epochs": 3})
    training = FakeTraining(sessions, params)
    training.submit()
    training.claim()
    for accuracy in (0.5, 0.75, 0.875):
        training.run_epoch(accuracy)  # 10 steps each
    return training


@pytest.mark.parametrize("page", [5, 7, 10, 1000])
def test_the_metrics_csv_goes_out_a_page_at_a_time_each_epochs_accuracy_on_its_last_step(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, page: int
) -> None:
    """Pages that end on an epoch's last step, past it and before it: each row once, in order,
    and no piece holds more than a page of rows (the whole CSV was built at once: 330 MB of
    the API's memory a download of 960,000 steps)."""
    training = _three_epochs(sessions)
    monkeypatch.setattr(jobs, "CSV_READ_STEPS", page)
    pieces = jobs.metrics_csv(sessions, training.job_id)
    assert pieces is not None
    texts = list(pieces)
    assert all(text.count("\n") <= page + 1 for text in texts)
    rows = [line.split(",") for line in "".join(texts).splitlines()]
    assert rows[0] == ["step", "epoch", "examples_seen", "loss", "test_accuracy"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 31))
    shown = {int(r[0]): r[4] for r in rows[1:] if r[4]}
    assert shown == {10: "0.5", 20: "0.75", 30: "0.875"}
    assert jobs.metrics_csv(sessions, "0" * 32) is None


@pytest.mark.parametrize("meanwhile", ["deleted", "ran again"])
def test_a_csv_whose_job_is_deleted_or_runs_again_as_it_goes_out_is_cut_short(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """Each page is read in a session of its own: a job deleted meanwhile ended the CSV at
    once, as if its first rows were all there were; one that ran again mixed two runs."""
    training = _three_epochs(sessions)
    monkeypatch.setattr(jobs, "CSV_READ_STEPS", 5)
    pieces = jobs.metrics_csv(sessions, training.job_id)
    assert pieces is not None
    assert next(pieces).count("\n") == 1 + 4  # the header, and rows held for their next
    if meanwhile == "deleted":
        with sessions.begin() as session:
            session.delete(session.get_one(Job, training.job_id))
    else:
        lapse_leases(sessions, training.job_id)
        training.worker_id = "another"
        training.claim()
    with pytest.raises(jobs.DownloadCutShort):
        list(pieces)


def test_a_csv_waits_out_an_outage_between_its_pages(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    training = _three_epochs(sessions)
    monkeypatch.setattr(jobs, "CSV_READ_STEPS", 7)
    real = metric_repo.read_steps
    failures = iter([True, True])  # the second page's read fails twice, then works

    def flaky(db: Any, job_id: str, *, after_step: int, limit: int) -> list[dict[str, Any]]:
        if after_step and next(failures, False):
            raise DisconnectionError("the server closed the connection")
        return real(db, job_id, after_step=after_step, limit=limit)

    monkeypatch.setattr(metric_repo, "read_steps", flaky)
    pieces = jobs.metrics_csv(sessions, training.job_id)
    assert pieces is not None
    rows = "".join(pieces).splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 31))
    assert next(failures, None) is None  # both failures met
