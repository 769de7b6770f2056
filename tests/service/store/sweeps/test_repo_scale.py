"""A trial's end costs the same whatever its sweep's size: counted in SQLite's
virtual-machine steps, never timed (timing is the benchmarks'). Each trial's end read every
trial of its sweep to count them, which made a sweep's cost grow with the square of its trials."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, event, update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain import sweeps
from service.schemas.sweeps import SweepCreate
from service.status import JobStatus, SweepStatus
from service.store import job_repo
from service.store.sweeps import repo as sweep_repo
from service.store.tables import Job
from tests.service.store.sweeps.test_repo import LIMITS, claim, finish, sweep_row

SMALL, LARGE = 20, 400


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite's own: its steps are what is counted (PostgreSQL's plans are not counted here);
    the suite's engine and sessions fixtures are built on it."""
    return sqlite_url


def vm_steps(engine: Engine, work: Callable[[], object]) -> int:
    """How many steps SQLite's virtual machine ran for ``work``'s statements, rows fetched
    included (SQLite makes a row as it is fetched): the work done, not the time it took."""
    steps = [0]
    counted: list[Any] = []

    def count() -> int:
        steps[0] += 1
        return 0  # go on

    def before(conn: Any, *_: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        if dbapi not in counted:
            dbapi.set_progress_handler(count, 1)
            counted.append(dbapi)

    event.listen(engine, "before_cursor_execute", before)
    try:
        work()
    finally:
        event.remove(engine, "before_cursor_execute", before)
        for dbapi in counted:
            dbapi.set_progress_handler(None, 1)
    return steps[0]


def new_sweep(sessions: sessionmaker[Session], trials: int) -> str:
    body = SweepCreate.model_validate({"grid": {"seed": list(range(trials))}})
    with sessions() as session:
        return sweeps.create(session, body, **{**LIMITS, "max_trials": LARGE}).id


def late_trials_end(sessions: sessionmaker[Session], engine: Engine, trials: int) -> int:
    """The steps of one trial's end late in a sweep of ``trials``: every trial before it has
    ended, the one after it is still queued (so the sweep goes on)."""
    sweep_id = new_sweep(sessions, trials)
    with sessions.begin() as session:
        ended = sweep_repo.trial_ids(session, sweep_id)[:-2]
        session.execute(
            update(Job)
            .where(Job.id.in_(ended))
            .values(status=JobStatus.SUCCEEDED, finished_at=utcnow(), accuracy=0.5)
        )
    job = claim(sessions, "w")
    steps = vm_steps(engine, lambda: finish(sessions, job, JobStatus.SUCCEEDED, accuracy=0.5))
    assert sweep_row(sessions, sweep_id).status == SweepStatus.RUNNING
    with sessions.begin() as session:  # its last trial: out of the next sweep's way
        job_repo.cancel_trials(session, sweep_id, now=utcnow())
        sweep_repo.settle(session, sweep_id, utcnow())
    assert sweep_row(sessions, sweep_id).status == SweepStatus.SUCCEEDED
    return steps


def test_a_trials_end_does_as_much_in_a_large_sweep_as_in_a_small_one(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    """It read all of a sweep's trials to learn whether one was unfinished: 20 times the
    trials, about 20 times the steps (61% of a worker's time in a 10,000-trial sweep)."""
    small = late_trials_end(sessions, engine, SMALL)
    large = late_trials_end(sessions, engine, LARGE)
    assert large < small * 1.2, (small, large)
