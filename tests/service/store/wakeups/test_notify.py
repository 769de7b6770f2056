"""PostgreSQL's wake-ups: a LISTENing connection that comes back after it was cut."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service.store import wakeups
from service.store.engines import make_engine, make_sessionmaker
from service.store.wakeups import JOB_QUEUED
from service.store.wakeups.notify import NotifyListener
from tests.conftest import OwnPostgres, refused, terminate_backends
from tests.support import thread_wakes_over, wait_for

WOKEN_WITHIN_S = 10.0
IDLE_WINDOW_S = 1.0  # an idle listener is watched this long


def publish(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        wakeups.publish(session, JOB_QUEUED)


def backend_pids(own_postgres: OwnPostgres) -> set[int]:
    with own_postgres.admin.connect() as conn:
        rows = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :name"),
            {"name": own_postgres.name},
        )
        return {pid for (pid,) in rows}


def test_a_cut_listening_connection_reconnects_and_wakes_its_waiters(
    own_postgres: OwnPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.wakeups")
    url = own_postgres.url
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    wakeups.attach(sessions, url, enabled=True)
    try:
        with wakeups.listen(url, [JOB_QUEUED], enabled=True) as listener:
            assert isinstance(listener, NotifyListener)
            assert listener.connected.wait(WOKEN_WITHIN_S)
            first = listener.backend_pid
            with listener.subscribe(JOB_QUEUED) as queued:
                queued.wait(0)
                terminate_backends(own_postgres.admin, own_postgres.name)
                # Back on a new connection, it wakes its waiters once (they may have missed some).
                assert queued.wait(WOKEN_WITHIN_S)
                wait_for(
                    lambda: listener.connected.is_set() and listener.backend_pid != first,
                    timeout_s=WOKEN_WITHIN_S,
                    what="the listener to reconnect",
                )
                queued.wait(0)
                publish(sessions)
                assert queued.wait(WOKEN_WITHIN_S)
        assert not listener.connected.is_set()
    finally:
        engine.dispose()
    said = [r.getMessage() for r in caplog.records if "listening" in r.getMessage()]
    assert [line.split(" (")[0] for line in said] == [
        "wake-ups: listening failed",
        "wake-ups: listening again",
    ]
    assert "\n" not in said[0], said[0]  # libpq's message runs to three lines: its first


def test_while_the_database_refuses_waiters_time_out_and_wake_when_it_is_back(
    own_postgres: OwnPostgres,
) -> None:
    url = own_postgres.url
    with wakeups.listen(url, [JOB_QUEUED], enabled=True) as listener:
        assert listener.connected.wait(WOKEN_WITHIN_S)
        with listener.subscribe(JOB_QUEUED) as queued:
            queued.wait(0)
            with refused(own_postgres.admin, own_postgres.name):
                wait_for(
                    lambda: not listener.connected.is_set(),
                    timeout_s=WOKEN_WITHIN_S,
                    what="the listener to notice",
                )
                queued.wait(0)
                assert not queued.wait(0.2)  # nothing to wake it: its timeout ends the wait
            assert queued.wait(WOKEN_WITHIN_S)  # back: woken to look again
            assert listener.connected.wait(WOKEN_WITHIN_S)


def test_a_listener_sleeps_until_news_and_closing_it_ends_its_wait(
    own_postgres: OwnPostgres,
) -> None:
    """The listening thread waits for the server or its close, without a timeout: psycopg's
    own wait woke it 10 times a second. Closing it wakes it to end."""
    listener = wakeups.listen(own_postgres.url, [JOB_QUEUED], enabled=True)
    assert isinstance(listener, NotifyListener)
    assert listener.connected.wait(WOKEN_WITHIN_S)
    thread = listener._thread
    assert thread_wakes_over(thread, IDLE_WINDOW_S) <= 3  # psycopg's wait: 10
    backend = listener.backend_pid
    listener.close()
    assert not thread.is_alive()  # close() waits up to CONNECT_TIMEOUT_S + 1 for it
    assert not listener.connected.is_set()
    wait_for(
        lambda: backend not in backend_pids(own_postgres),
        timeout_s=WOKEN_WITHIN_S,
        what="the listening connection to close",
    )


def test_a_listener_closed_at_once_ends_too(own_postgres: OwnPostgres) -> None:
    """Closed as it starts, before or after its connection is up (the ring waits in its
    socket until the thread looks), the thread ends instead of waiting."""
    listener = wakeups.listen(own_postgres.url, [JOB_QUEUED], enabled=True)
    assert isinstance(listener, NotifyListener)
    listener.close()
    assert not listener._thread.is_alive()
