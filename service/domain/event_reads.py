"""What an event stream's poll reads, where it reads it, and one read shared by a job's streams.

Every open stream of a job polls at each of the job's writes (:mod:`service.domain.events`).
Streams that stand at the same place (every stream that has caught up stands at the job's
last step) would read the same rows and build the same events from them: :class:`SharedReads`
lets the second take the first's read, and the events the first built from it, when no write
has been announced in between. Only where reads run on the event loop (the API on SQLite), one
at a time; reads in threads may overlap, and share nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.to_thread
from cachetools import TTLCache
from sqlalchemy.orm import Session, sessionmaker

from service.store import job_repo, metric_repo
from service.store.engines import Reader

T = TypeVar("T")
# Places (a job and a stream position) whose last read is kept: more than the places streams
# stand at at once (most of a job's streams stand at its last step). A read is wanted by the
# streams woken with the one that made it, a few milliseconds later, and by streams that open
# before the job's next write: kept for KEPT_S at most, so that reads nobody will take again
# (a job's last streams gone, a page read while catching up) leave memory soon.
SHARED_PLACES = 256
KEPT_S = 1.0
# The most ways of standing at one read's place whose events are kept with it: streams of one
# place differ in their count of events sent and in the status they last sent (a stream
# resumed, or opened later).
BUILT_PER_READ = 8


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
    """A read kept for a job's other streams (:class:`SharedReads` keeps it under the place it
    was made at): the listener's generation for the job just before it began, and its place in
    the order of reads (a larger one saw a later snapshot: reads on the event loop never
    overlap)."""

    generation: int | None
    order: int
    news: News
    built: dict[Hashable, Any] = field(default_factory=dict, compare=False)

    def once(self, stood: Hashable, build: Callable[[], T]) -> T:
        """What ``build()`` makes of this read for a stream that stood as ``stood`` says, made
        once: the events of one read are the same for every stream that stood alike, so each
        is built (its JSON written) once, not once per stream. Never changed once made."""
        if stood in self.built:
            return cast(T, self.built[stood])
        made = build()
        if len(self.built) < BUILT_PER_READ:
            self.built[stood] = made
        return made


class SharedReads:
    """The last read at each place of a followed job in this process, for the job's other
    streams: those woken by the same wake-up, and those that open before the job's next one.
    Only for reads on the event loop (``StreamReads.loop_steps`` set): one at a time, each kept
    as it ends, so the read kept at a place is its newest; and only with the wake-up listener
    whose generations it is given (no lock: the loop's own).

    A stream takes the read kept at its position when the listener's generation for the job is
    the one that read began with (no wake-up has arrived since, so it holds every write announced
    so far, the one that woke this stream included) and that read is newer than the last one the
    stream used (a job's status must never go back). A woken stream needs no more. A stream's
    first poll (it subscribed before it asked, so a later write wakes it) also needs the read to
    have seen the job's row as the stream's opening read did (``like``): a wake-up that has not
    reached this process may be one a client has already been sent by another, and a client
    that reconnects here must not be sent an older job than its opening read saw. A stream
    catching up page by page, and the fallback poll after ``events_poll_s`` (there for a lost
    wake-up, so it must see past the kept read), read for themselves and keep their reads here.
    Places are kept apart, so that streams a write behind the others (opened as it landed) do
    not take turns replacing the read the others share.
    """

    def __init__(self, places: int = SHARED_PLACES, kept_s: float = KEPT_S) -> None:
        self._kept: TTLCache[tuple[str, Position], SharedRead] = TTLCache(places, kept_s)
        self._order = itertools.count(1)
        self.reused = 0  # reads taken from another stream (what the tests look at)

    def get(
        self,
        job_id: str,
        at: Position,
        generation: int | None,
        *,
        after: int,
        like: SimpleNamespace | None = None,
    ) -> SharedRead | None:
        """The read kept at the job's place ``at``, if made from ``generation``, later than the
        read ``after`` orders (the asking stream's last) and, given ``like``, having read the
        job's row as ``like`` is; else None."""
        kept = self._kept.get((job_id, at))
        if generation is None or kept is None or kept.order <= after:
            return None
        if kept.generation != generation or (like is not None and kept.news.job != like):
            return None
        self.reused += 1
        return kept

    def keep(self, job_id: str, at: Position, generation: int | None, news: News) -> SharedRead:
        """Keep a read that has just ended, begun at ``at`` from ``generation``."""
        read = SharedRead(generation, next(self._order), news)
        if generation is not None:
            self._kept[(job_id, at)] = read
        return read
