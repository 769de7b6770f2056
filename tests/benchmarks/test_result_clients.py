"""The time-to-result benchmark's database watcher, on both databases: it reads at once when its
job's wake-up arrives, and stops reading once the job has left the queue unless it watches the
steps."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from benchmarks import result_clients
from benchmarks.result_clients import Watcher
from service.store import wakeups
from service.store.engines import read_engine
from tests.service.store.test_repository import add_job, claim, flush
from tests.support import wait_for

# The watcher's own pause in these tests: far longer than any wait below, so that only a
# wake-up can make it read again in time.
NEVER_S = 60.0


def woken_until(heard: wakeups.Listener, job_id: str, done: Callable[[], bool], what: str) -> None:
    """Deliver the job's wake-up until ``done`` (a wake-up delivered before the watcher
    subscribed is nobody's, so one is not enough)."""

    def probe() -> bool:
        heard.deliver(wakeups.JOB_PROGRESS, job_id)
        return done()

    wait_for(probe, timeout_s=NEVER_S / 4, what=what)


def last_seen_is(watcher: Watcher, step: int) -> bool:
    """Whether the last step the watcher has seen is ``step``."""
    return bool(watcher.seen) and watcher.seen[-1][0] == step


def test_a_claim_is_seen_on_its_wake_up_and_then_the_watcher_stops(
    engine: Engine, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(result_clients, "WATCH_EVERY_S", NEVER_S)
    job_id = add_job(sessions)
    heard = wakeups.Listener()  # delivers only what the test hands it
    watcher = Watcher(read_engine(engine), job_id, steps=False, heard=heard)
    watcher.start()
    try:
        assert claim(sessions, "w") is not None
        # The watcher ends by itself: the job has left the queue.
        woken_until(heard, job_id, lambda: not watcher.is_alive(), "the watcher to see the claim")
        assert watcher.left_queue is not None and watcher.left_queue_wall is not None
    finally:
        watcher.stop()


def test_a_step_watcher_sees_each_flush_on_its_wake_up_and_reads_until_stopped(
    engine: Engine, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(result_clients, "WATCH_EVERY_S", NEVER_S)
    job_id = add_job(sessions)
    heard = wakeups.Listener()
    watcher = Watcher(read_engine(engine), job_id, steps=True, heard=heard)
    watcher.start()
    try:
        job = claim(sessions, "w")
        assert job is not None
        for steps in (range(1, 4), range(4, 8)):
            flush(sessions, job, "w", steps)
            last = steps[-1]
            woken_until(
                heard,
                job_id,
                functools.partial(last_seen_is, watcher, last),
                f"the watcher to see step {last}",
            )
        assert watcher.is_alive()  # a step watcher reads until it is stopped
    finally:
        sightings = [step for step, _ in watcher.stop()]
    assert sightings == [3, 7]
    assert not watcher.is_alive()
