"""What an event stream's poll reads, where it reads it, and one read shared by a job's streams.

Every open stream of a job polls at each of the job's writes (:mod:`service.domain.events`).
Streams that stand at the same place (every stream that has caught up stands at the job's
last step) would read the same rows: :class:`SharedReads` lets the second take the first's
read when no write has been announced in between. Only where reads run on the event loop (the
API on SQLite), one at a time; reads in threads may overlap, and share nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from cachetools import LRUCache
from sqlalchemy.orm import Session, sessionmaker

from service.store import job_repo, metric_repo
from service.store.engines import Reader

T = TypeVar("T")
# Jobs whose last read is kept; more than the jobs followed at once, as a stream's read is
# wanted only by the job's other streams woken with it (a few milliseconds later).
SHARED_JOBS = 256


class StreamReads(Protocol):
    """Where a stream's polls read the database."""

    @property
    def loop_steps(self) -> int | None:
        """The most steps one read may hold the event loop for; None: reads run in threads."""

    async def read(self, read: Callable[[Reader], T]) -> T:
        """``read`` in one reading transaction; a database error propagates."""


class SessionReads:
    """A stream's polls in a worker thread each, in a session of the ``sessions`` given.

    The API's streams read through the polls' connections instead
    (:class:`service.api.lanes.polls.PollReads`, on the event loop on SQLite): every open stream
    of a job polls at each of its writes, and a thread hand-off, a session and the shared
    pool's checkout cost each poll more than its read (docs/benchmarks.md)."""

    loop_steps: int | None = None

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    async def read(self, read: Callable[[Reader], T]) -> T:
        """``read`` in a session of its own, in a worker thread."""

        def in_session() -> T:
            with self.sessions() as session:
                return read(session)

        return await anyio.to_thread.run_sync(in_session)


@dataclass(frozen=True)
class Position:
    """Where a poll reads from: the stream's attempt, the last epoch and step it was sent, and
    how many steps one read takes at most: a cursor's place
    (:func:`service.domain.events.position`) without what tells streams apart (their count of
    events sent, and the final mark), so that streams at one place read alike and may share a
    read."""

    attempt: int
    epoch: int
    step: int
    limit: int


@dataclass(frozen=True)
class News:
    """One poll's read: the job's row (None: it was deleted) and, after the position read from
    (from the start for an attempt the stream has not seen), its epochs and at most ``limit``
    of its steps. Shared by streams: never changed."""

    job: SimpleNamespace | None
    epochs: tuple[dict[str, Any], ...] = ()
    steps: tuple[dict[str, Any], ...] = ()


def read_news(db: Reader, job_id: str, at: Position) -> News:
    """Read what is new for a stream at ``at``, in this order: the job, then its epochs, then its
    steps. An epoch row is written in the same transaction as its last steps, so every epoch read
    here has its steps visible to the read that follows; and once the job's status is terminal,
    the steps read after it are all there will ever be."""
    job = job_repo.job_row(db, job_id)
    if job is None:
        return News(None)
    epoch, step = (at.epoch, at.step) if job.attempt == at.attempt else (0, 0)
    epochs = metric_repo.read_epochs(db, job.id, after_epoch=epoch)
    steps = metric_repo.read_steps(db, job.id, after_step=step, limit=at.limit)
    return News(job, tuple(epochs), tuple(steps))


@dataclass(frozen=True)
class SharedRead:
    """A read kept for a job's other streams: where it was made, the listener's generation for
    the job just before it began, and its place in the order of reads (a larger one saw a later
    snapshot: reads on the event loop never overlap)."""

    at: Position
    generation: int | None
    order: int
    news: News


class SharedReads:
    """Each followed job's last read in this process, for the job's other streams woken by the
    same wake-up. Only for reads on the event loop (``StreamReads.loop_steps`` set): one at a
    time, each kept as it ends, so the read kept is the newest; and only with the wake-up
    listener whose generations it is given (no lock: the loop's own).

    A stream woken by a wake-up takes the read kept at its position when the listener's
    generation for the job is the one that read began with (no wake-up has arrived since, so it
    holds every write announced so far, the one that woke this stream included) and that read
    is newer than the last one the stream used (a job's status must never go back). A poll that
    was not woken (a stream's first, a page of a stream catching up, the fallback after
    ``events_poll_s`` for a lost wake-up) reads for itself and keeps its read here.
    """

    def __init__(self, jobs: int = SHARED_JOBS) -> None:
        self._last: LRUCache[str, SharedRead] = LRUCache(maxsize=jobs)
        self._order = itertools.count(1)
        self.reused = 0  # reads taken from another stream (what the tests look at)

    def get(
        self, job_id: str, at: Position, generation: int | None, *, after: int
    ) -> SharedRead | None:
        """The job's kept read, if made at ``at`` from ``generation`` and later than the read
        ``after`` orders (the asking stream's last); else None."""
        last = self._last.get(job_id)
        if generation is None or last is None or last.order <= after:
            return None
        if (last.at, last.generation) != (at, generation):
            return None
        self.reused += 1
        return last

    def keep(self, job_id: str, at: Position, generation: int | None, news: News) -> SharedRead:
        """Keep a read that has just ended, begun at ``at`` from ``generation``."""
        read = SharedRead(at, generation, next(self._order), news)
        if generation is not None:
            self._last[job_id] = read
        return read
