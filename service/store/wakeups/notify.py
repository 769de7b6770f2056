"""Wake-ups across machines (PostgreSQL): ``LISTEN``/``NOTIFY``.

A publisher calls ``pg_notify`` inside its writing transaction: the server delivers the
notification when (and only if) the transaction commits, and folds duplicates of one
transaction into one. Each listening process holds one autocommit connection of its own
that ``LISTEN`` s on the channels of its topics. When that connection drops, the listener
reconnects with backoff (:class:`~service.store.outage.Backoff`); meanwhile its waiters fall
back to their timeouts, and once it is back every waiter is woken once to look again.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Sequence

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.orm import Session

from service.store.engines import POSTGRES_CONNECT_TIMEOUT_S, postgres_connect_args
from service.store.outage import Backoff, first_line, is_outage
from service.store.wakeups import stage_after_commit, staged_in
from service.store.wakeups.waiters import Listener

log = logging.getLogger("service.wakeups")

CHANNEL_PREFIX = "mnist_"  # the channel of topic T is mnist_T


class NotifyPublisher:
    """``pg_notify`` in the writing transaction: all of its wake-ups in one statement, just
    before it commits, rather than a round trip each (a pack's claim made one per job).

    One ``pg_notify`` per row of the two arrays unnested, not one per column: a SELECT may
    list at most 1664 columns, and a transaction may wake thousands of keys (cancelling a
    sweep wakes each of its trials' streams; a claim settles every lease that ran out).
    Nothing publishes from a flush (no ORM event hooks do): the commit's own flush runs after
    this statement, so a wake-up published there would not be sent.
    """

    def stage(self, session: Session, topic: str, key: str) -> None:
        """Kept until the transaction is about to commit (dropped if it rolls back)."""
        stage_after_commit(session, topic, key)

    def seal(self, session: Session) -> None:
        """Notify, in the transaction: the server delivers on commit, drops on rollback."""
        staged = sorted(staged_in(session))
        if staged:
            channels = [CHANNEL_PREFIX + topic for topic, _ in staged]
            session.execute(_NOTIFY_ALL, {"channels": channels, "keys": [k for _, k in staged]})

    def send(self, wakes: set[tuple[str, str]]) -> None:
        """Nothing to do after commit: the server has delivered them (see :meth:`seal`)."""


_NOTIFY_ALL = text(
    "SELECT pg_notify(channel, key) "
    "FROM unnest(CAST(:channels AS text[]), CAST(:keys AS text[])) AS wake(channel, key)"
)


class NotifyListener(Listener):
    """One connection that LISTENs, and the thread that reads its notifications.

    The thread sleeps until the server sends something (a notification, or the connection's
    end) or :meth:`close` writes to a socket pair of the listener's own: psycopg's own wait for
    notifications wakes every 0.1 s, and where an idle process's memory goes cold each such wake
    cost milliseconds of CPU (docs/benchmarks.md, Time to result). libpq's socket is only ever
    touched by this thread.
    """

    def __init__(self, conninfo: str, topics: Sequence[str]) -> None:
        super().__init__()
        self._conninfo = conninfo
        # The pool's own bounds: a LISTEN on a connection gone dead waited for 2 h of TCP.
        self._connect_args = postgres_connect_args(conninfo_to_dict(conninfo))
        self._topics = list(topics)
        self._closed = threading.Event()
        self._bell, self._ring = socket.socketpair()  # close() rings: the thread wakes
        self.backend_pid: int | None = None  # the listening connection's server process
        self._thread = threading.Thread(target=self._run, name="wakeups", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = Backoff()
        try:
            while not self._closed.is_set():
                try:
                    self._listen(backoff)
                except (psycopg.Error, OSError) as exc:
                    self.connected.clear()
                    self.backend_pid = None
                    level = logging.INFO if is_outage(exc) else logging.WARNING
                    if backoff.failures == 0 and not self._closed.is_set():
                        why = first_line(exc)
                        log.log(level, "wake-ups: listening failed (%s); polling until back", why)
                self._closed.wait(backoff.next_delay())
        finally:
            self.connected.clear()  # however the thread ends
            self._bell.close()

    def _listen(self, backoff: Backoff) -> None:
        with (
            psycopg.connect(self._conninfo, autocommit=True, **self._connect_args) as conn,
            selectors.DefaultSelector() as selector,
        ):
            for topic in self._topics:
                channel = sql.Identifier(CHANNEL_PREFIX + topic)
                conn.execute(sql.SQL("LISTEN {}").format(channel))
            self.backend_pid = conn.info.backend_pid
            if backoff.failures:
                log.info("wake-ups: listening again")
            backoff.reset()
            self.deliver_all()  # what was published before LISTEN took effect is not lost
            self.connected.set()
            selector.register(conn.pgconn.socket, selectors.EVENT_READ, "server")
            selector.register(self._bell, selectors.EVENT_READ, "close")
            while True:
                ready = {key.data for key, _ in selector.select()}
                if "close" in ready:
                    self.connected.clear()
                    return
                for note in conn.notifies(timeout=0):  # what came, without waiting
                    self.deliver(note.channel.removeprefix(CHANNEL_PREFIX), note.payload)

    def close(self) -> None:
        """Stop the thread (it wakes at the ring); its connection closes with it."""
        self._closed.set()
        with contextlib.suppress(OSError):  # closed already
            self._ring.send(b"x")
        self._thread.join(timeout=POSTGRES_CONNECT_TIMEOUT_S + 1)
        self._ring.close()
        self.connected.clear()
