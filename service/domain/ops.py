"""Operations: readiness checks and the figures behind the Prometheus metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import NotReady
from service.schemas import Readiness, ReadinessCheck
from service.settings import Settings
from service.status import JobStatus
from service.store import availability, engines, job_repo, migrations, worker_repo
from service.store.outage import is_outage
from service.store.upkeep import usage

log = logging.getLogger("service.ops")
# How long /readyz and the metrics reuse the store's size: pg_database_size walks the
# database's files, and a balancer may poll /readyz every second.
STORE_SIZE_TTL_S = 30.0


def _check_migrations(session: Session) -> ReadinessCheck:
    try:
        heads = migrations.head_revisions()
    except FileNotFoundError as exc:
        # /readyz is public: the path goes to the log, not to whoever asks.
        log.error("readiness: the migration scripts cannot be found: %s", exc)
        return ReadinessCheck(name="migrations", ok=False, detail="migration scripts not found")
    problem = migrations.schema_problem(session.connection())
    at_head = f"at head {migrations.revisions_text(heads)}"
    return ReadinessCheck(name="migrations", ok=problem is None, detail=problem or at_head)


def _check_file(session: Session) -> ReadinessCheck:
    """SQLite: whether the file this process opened is still the one at its path."""
    try:
        gone = engines.opened_file_gone(session)  # its writes would go where none will read
    except OSError as exc:  # its folder out of reach (its permissions): no answer either way
        detail = f"its file cannot be read ({type(exc).__name__})"
        return ReadinessCheck(name="database", ok=False, detail=detail)
    if gone:
        detail = "its file (or its -wal) was removed or replaced since this process opened it"
        return ReadinessCheck(name="database", ok=False, detail=detail)
    return ReadinessCheck(name="database", ok=True, detail="reachable")


def _note_failure(what: str, error: SQLAlchemyError) -> None:
    # An outage is logged as it starts and ends (not at every poll of a balancer); anything
    # else is logged as it happens.
    if is_outage(error):
        availability.API_OUTAGE.failed(error, what)
    else:
        log.warning("%s: database error: %s", what, error)


UNDER_WAY = ReadinessCheck(name="writes", ok=False, detail="the first probe is under way")


class WriteProbe:
    """Whether the database takes writes, learnt by writing (:func:`availability.probe_write`)
    at most every ``every_s`` seconds: a balancer polling /readyz costs a write a second at
    most, whatever the number of callers. Callers that come while a probe runs do not wait for
    it: they get the last answer, or "under way" before the first. A probe waits as long as
    the database's lock does (SQLite's busy timeout, 30 s); callers that queued behind it each
    held a thread of the pool, and a hundred /readyz (no key needed) stalled every route."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        every_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, ReadinessCheck] | None = None

    def check(self, now: datetime) -> ReadinessCheck:
        """The last probe's answer while it is fresh, else a new probe's; while another
        caller's probe runs, the last answer, whatever its age."""
        if (fresh := self._fresh()) is not None:
            return fresh
        if not self._lock.acquire(blocking=False):
            return UNDER_WAY if self._last is None else self._last[1]
        try:
            if (fresh := self._fresh()) is not None:  # a probe that ended as this caller came
                return fresh
            result = self._probe(now)
            self._last = (self._clock(), result)
            return result
        finally:
            self._lock.release()

    def _fresh(self) -> ReadinessCheck | None:
        """The last answer while it is younger than ``every_s``, else None."""
        last = self._last
        return last[1] if last is not None and self._clock() - last[0] < self._every_s else None

    def _probe(self, now: datetime) -> ReadinessCheck:
        try:
            with self._sessions() as session:
                availability.probe_write(session, now)
        except SQLAlchemyError as exc:
            _note_failure("readiness write probe", exc)
            return ReadinessCheck(name="writes", ok=False, detail=f"failing: {type(exc).__name__}")
        return ReadinessCheck(name="writes", ok=True, detail="a committed write succeeded")


class StoreSize:
    """The database's size in bytes (:func:`usage.store_bytes`), read at most every ``ttl_s``
    seconds by one caller while the others wait and share it: ``/readyz`` and the metrics
    scrape report it without paying for it each time."""

    def __init__(
        self, ttl_s: float = STORE_SIZE_TTL_S, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, int, str] | None = None

    def read(self, session: Session) -> tuple[int | None, str]:
        """The size and what it counts (see :func:`usage.describe`), fresh within ``ttl_s``;
        None while the files cannot be looked at (not kept: it is asked again next time)."""
        with self._lock:
            if self._last is None or self._clock() - self._last[0] >= self._ttl_s:
                if (size := usage.store_bytes(session)) is None:
                    return None, usage.describe(session)
                self._last = (self._clock(), size, usage.describe(session))
            return self._last[1], self._last[2]

    def check(self, session: Session) -> ReadinessCheck:
        """The size as a readiness check: it informs, and fails nothing (a full disk fails the
        write probe) but files out of reach."""
        size, what = self.read(session)
        if size is None:
            return ReadinessCheck(name="storage", ok=False, detail=f"{what} cannot be read")
        return ReadinessCheck(name="storage", ok=True, detail=f"{size} bytes ({what})")


def readiness(
    session: Session,
    settings: Settings,
    *,
    now: datetime,
    writes: WriteProbe,
    size: StoreSize | None = None,
) -> Readiness:
    """Database reachable and taking writes, schema at the migrations' head, a live worker if
    one is required.

    Raises :class:`NotReady` (503, with ``Retry-After``) naming what failed, with every check
    as details.
    """
    checks: list[ReadinessCheck] = []
    try:
        engines.ping(session)
        checks.append(_check_file(session))
        checks.append(_check_migrations(session))
        # The tables read below are the head's: on an empty database a missing one was
        # reported as the database being unreachable, beside "reachable".
        if checks[-1].ok:
            live = len(worker_repo.live_workers(session, lease_s=settings.lease_s))
            required = settings.ready_requires_worker
            checks.append(
                ReadinessCheck(
                    name="workers",
                    ok=live > 0 or not required,
                    detail=f"{live} live (heartbeat within {settings.lease_s:g} s); "
                    + ("at least one required" if required else "none required"),
                )
            )
            if size is not None:
                checks.append(size.check(session))
    except SQLAlchemyError as exc:
        _note_failure("readiness", exc)
        # Reached, and a read after the ping failed (a statement cancelled, a lock not had):
        # one "database" check, which says so, not "reachable" beside "unreachable".
        reached = any(c.name == "database" and c.ok for c in checks)
        checks = [c for c in checks if c.name != "database"]
        failure = "a read failed" if reached else "unreachable"
        checks.insert(
            0,
            ReadinessCheck(name="database", ok=False, detail=f"{failure}: {type(exc).__name__}"),
        )
    else:
        session.rollback()  # the read snapshot ends here: the probe writes in its own session
        if all(c.ok for c in checks if c.name == "migrations"):  # its table exists at head
            checks.append(writes.check(now))
    failed = [c for c in checks if not c.ok]
    if failed:
        raise NotReady(
            "not ready: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
            details=[c.model_dump() for c in checks],
        )
    availability.API_OUTAGE.ok()
    return Readiness(status="ready", checks=checks)


@dataclass(frozen=True)
class StoreFigures:
    """What the database says at one scrape."""

    jobs_by_status: dict[JobStatus, int]
    queue_depth: int
    live_workers: int
    images_per_second: float
    store_bytes: int | None = None


class Throughput:
    """Training images per second across running jobs, from their recorded steps.

    Each running attempt's newest step (its examples seen) and the time the worker wrote it
    form a sample; the rate is the difference to the previous scrape's sample, so it covers
    the interval between scrapes. An attempt seen for the first time is rated from its start
    where it began from nothing; one that resumed (or kept) finished epochs is rated from the
    next scrape: its examples seen count the earlier attempts' images, which rated from its
    start came out many times the true rate. A job whose lease expired is not sampled (no
    worker trains it), so a dead worker's last rate does not stand.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (job id, attempt) → (examples seen, written at, images/s)
        self._last: dict[tuple[str, int], tuple[int, datetime, float]] = {}

    def update(self, samples: list[job_repo.RunningSample]) -> float:
        """Take this scrape's samples; the summed rate of the running attempts."""
        with self._lock:
            current: dict[tuple[str, int], tuple[int, datetime, float]] = {}
            for s in samples:
                if s.heartbeat_at is None:
                    continue
                key = (s.job_id, s.attempt)
                previous = self._last.get(key)
                if previous is not None and s.heartbeat_at <= previous[1]:
                    current[key] = previous  # nothing written since: the last rate stands
                    continue
                if previous is None and s.resume_epoch > 0:
                    current[key] = (s.examples_seen, s.heartbeat_at, 0.0)  # rated from here
                    continue
                base_examples, base_time = (
                    (previous[0], previous[1]) if previous else (0, s.started_at or s.heartbeat_at)
                )
                seconds = (s.heartbeat_at - base_time).total_seconds()
                rate = (s.examples_seen - base_examples) / seconds if seconds > 0 else 0.0
                current[key] = (s.examples_seen, s.heartbeat_at, max(rate, 0.0))
            self._last = current
            return sum(rate for _, _, rate in current.values())


def store_figures(
    session: Session,
    settings: Settings,
    throughput: Throughput,
    *,
    now: datetime,
    size: StoreSize | None = None,
) -> StoreFigures:
    """Jobs by status, queue depth, live workers, training throughput and the store's size."""
    by_status = job_repo.count_jobs_by_status(session)
    return StoreFigures(
        jobs_by_status=by_status,
        queue_depth=by_status[JobStatus.QUEUED],
        live_workers=len(worker_repo.live_workers(session, lease_s=settings.lease_s)),
        images_per_second=throughput.update(job_repo.running_samples(session)),
        store_bytes=None if size is None else size.read(session)[0],
    )
