"""Wake-ups: who waits for the queue or for a job is told when it changes, instead of polling.

The database stays the source of truth. A wake-up only says "look again now": a waiter always
re-reads the database, and a wake-up that is lost (a listener down, a datagram dropped) costs
latency, never a job, because every waiter also looks again after its fallback timeout
(``MNIST_POLL_INTERVAL_S`` for idle workers, ``MNIST_EVENTS_POLL_S`` for event streams).
With ``MNIST_WAKEUPS=false`` nothing is published or listened for: plain polling.

Publishing is part of the writing transaction (:func:`publish`): on PostgreSQL a
``pg_notify`` in it, which the server delivers on commit and drops on rollback
(:mod:`.notify`); on SQLite a datagram to every listening process's socket once the
transaction has committed (:mod:`.sockets`). Each process that waits has one
:class:`Listener` (a thread and a socket or a connection) that wakes its :class:`Waiter` s.

Alternatives considered: on SQLite a file watch (inotify) sees the WAL grow on every write,
not what changed, and is Linux-only; a FIFO or a TCP port needs one reader or one owner,
while a folder of datagram sockets lets any process publish to all without a server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.store.wakeups.waiters import AsyncWaiter, Listener, StopEvent, Waiter

__all__ = [
    "JOB_PROGRESS",
    "JOB_QUEUED",
    "AsyncWaiter",
    "Listener",
    "StopEvent",
    "Waiter",
    "attach",
    "listen",
    "publish",
    "waiting",
]

JOB_QUEUED = "queued"  # key "": a job became claimable
JOB_PROGRESS = "progress"  # key: the job whose status, steps or epochs changed
log = logging.getLogger("service.wakeups")

_PUBLISHER = "wakeups"  # the sessions' info entry that holds their publisher
_PENDING = "wakeups.pending"  # a session's wake-ups staged for after its commit


class Publisher(Protocol):
    """How one transport publishes: ``stage`` in the transaction, ``seal`` just before its
    commit (in it), ``send`` after commit."""

    def stage(self, session: Session, topic: str, key: str) -> None: ...

    def seal(self, session: Session) -> None: ...

    def send(self, wakes: set[tuple[str, str]]) -> None: ...


def publish(session: Session, topic: str, key: str = "") -> None:
    """Wake whoever waits for ``topic``/``key`` once this transaction commits (never before,
    never after a rollback); nothing for sessions without wake-ups (:func:`attach`)."""
    publisher: Publisher | None = session.info.get(_PUBLISHER)
    if publisher is not None:
        publisher.stage(session, topic, key)


def attach(sessions: sessionmaker[Session], url: str, *, enabled: bool) -> None:
    """Let the transactions of ``sessions`` publish wake-ups (idempotent; anything other than
    a sessionmaker, such as a test's stand-in, is left as it is)."""
    kind, where = _transport(url)
    if not isinstance(sessions, sessionmaker):
        return
    info: dict[str, Any] = dict(sessions.kw.get("info") or {})
    if not enabled or kind is None or _PUBLISHER in info:
        return
    if kind == "postgresql":
        from service.store.wakeups.notify import NotifyPublisher

        info[_PUBLISHER] = NotifyPublisher()
    else:
        from service.store.wakeups.sockets import SocketPublisher

        info[_PUBLISHER] = SocketPublisher(Path(where))
    sessions.configure(info=info)
    event.listen(sessions, "before_commit", _seal_staged)
    event.listen(sessions, "after_commit", _send_staged)
    event.listen(sessions, "after_rollback", _drop_staged)


def stage_after_commit(session: Session, topic: str, key: str) -> None:
    """Keep a wake-up to send once ``session`` commits (for transports outside the database)."""
    session.info.setdefault(_PENDING, set()).add((topic, key))


def staged_in(session: Session) -> set[tuple[str, str]]:
    """The wake-ups ``session``'s transaction has staged so far."""
    staged: set[tuple[str, str]] = session.info.get(_PENDING, set())
    return staged


def _seal_staged(session: Session) -> None:
    session.info[_PUBLISHER].seal(session)


def _send_staged(session: Session) -> None:
    wakes = session.info.pop(_PENDING, None)
    if wakes:
        session.info[_PUBLISHER].send(wakes)


def _drop_staged(session: Session) -> None:
    session.info.pop(_PENDING, None)


def listen(url: str, topics: Sequence[str], *, enabled: bool) -> Listener:
    """This process's listener for ``topics``: a plain :class:`Listener` (whose waiters only
    ever time out: polling) when wake-ups are off or the database has nowhere to carry them
    (an in-memory SQLite). Close it when done (it is a context manager)."""
    kind, where = _transport(url)
    if not enabled or kind is None:
        return Listener()
    if kind == "postgresql":
        from service.store.wakeups.notify import NotifyListener

        return NotifyListener(where, topics)
    from service.store.wakeups.sockets import SocketListener

    try:
        return SocketListener(Path(where), topics)
    except OSError as exc:  # no folder of sockets can be made here
        log.warning("wake-ups: cannot listen in %s (%s); polling", where, exc)
        return Listener()


@contextmanager
def waiting(url: str, topic: str, key: str = "", *, enabled: bool) -> Iterator[Waiter]:
    """A listener of this one topic and a waiter on it, for as long as the block runs."""
    with listen(url, [topic], enabled=enabled) as listener, listener.subscribe(topic, key) as w:
        yield w


def _transport(url: str) -> tuple[str | None, str]:
    """("postgresql", its libpq URL), ("sqlite", the sockets' folder) or (None, "")."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return "postgresql", parsed.set(drivername="postgresql").render_as_string(False)
    database = parsed.database or ""
    if backend != "sqlite" or database in ("", ":memory:") or "memory" in str(parsed.query):
        return None, ""
    return "sqlite", database.removeprefix("file:") + ".wake"
