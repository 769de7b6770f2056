"""The queue cap of job submissions (``MNIST_MAX_QUEUED_JOBS``), on both backends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.domain import jobs
from service.errors import InvalidInput, TooManyRequests
from service.schemas import JobCreate
from service.store.tables import Job

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
