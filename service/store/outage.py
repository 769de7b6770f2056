"""Riding out a database that cannot be reached: which errors mean that, and how to wait it out.

A database outage (PostgreSQL refusing or dropping connections, a SQLite file that cannot be
opened or written) is retried with capped exponential backoff and jitter, for as long as it
lasts; any other error is a bug or a real answer (``LeaseLost``) and is raised at once. One
:class:`Outage` is shared by a process's threads so that an outage is logged once when it
starts and once when it ends, not once per retry. A few lines of our own rather than
``tenacity``: the retries must share that outage state and an injectable clock and wait.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from sqlalchemy import exc as sa_exc

T = TypeVar("T")

BACKOFF_BASE_S = 0.1  # the first retry's delay...
BACKOFF_CAP_S = 5.0  # ...doubling up to this
# SQLite reports a file it cannot open, write or lock only in its message.
SQLITE_OUTAGE_MESSAGES = (
    "unable to open",
    "readonly",
    "disk i/o",
    "database or disk is full",
    "database is locked",
    "locking protocol",
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or written now (worth retrying).

    Schema errors, constraint violations and :class:`~service.errors.LeaseLost` are not.
    """
    if isinstance(exc, sa_exc.DisconnectionError):
        return True
    orig: BaseException | None = exc
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if isinstance(orig, sqlite3.OperationalError):
        message = str(orig).lower()
        return any(fragment in message for fragment in SQLITE_OUTAGE_MESSAGES)
    return False


@dataclass
class Backoff:
    """Capped exponential delays with jitter: each is between half and all of its step."""

    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S
    rng: Callable[[], float] = random.random
    failures: int = field(default=0, init=False)

    def next_delay(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        step = min(self.cap_s, self.base_s * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return step * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        """The last try worked: the next failure starts from the first delay again."""
        self.failures = 0


class Outage:
    """Whether the database is unreachable now, as a process's threads have found it.

    Logs one line when the first failure is seen and one, with the duration, when a call
    succeeds again.
    """

    def __init__(self, log: logging.Logger, *, clock: Callable[[], float] = time.monotonic):
        self._log = log
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None

    @property
    def down(self) -> bool:
        """Whether the last call to the database failed with an outage."""
        return self._since is not None

    def failed(self, exc: BaseException, what: str) -> None:
        """A call (``what``) failed with an outage error."""
        with self._lock:
            if self._since is not None:
                return
            self._since = self._clock()
        # The detail (a server address, a file name) is for the log, which is the operator's.
        self._log.warning(
            "database unreachable (%s: %s); retrying with backoff until it is back",
            what,
            _first_line(exc),
        )

    def ok(self) -> None:
        """A call to the database succeeded."""
        if self._since is None:  # the common case: no lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            self._log.warning("database is back after %.1f s", self._clock() - since)


def _first_line(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"


def retry(
    op: Callable[[], T],
    *,
    outage: Outage,
    what: str,
    wait: Callable[[float], object] = time.sleep,
    give_up: Callable[[], bool] | None = None,
    backoff: Backoff | None = None,
) -> T:
    """``op()``, tried again after each outage error until it succeeds.

    Other errors propagate at once. ``give_up`` is asked after each failure: when it says
    yes, the outage error propagates (a worker told to stop does not wait forever).
    """
    backoff = backoff or Backoff()
    while True:
        try:
            result = op()
        except Exception as exc:
            if not is_outage(exc):
                raise
            outage.failed(exc, what)
            if give_up is not None and give_up():
                raise
            wait(backoff.next_delay())
            if give_up is not None and give_up():
                raise
            continue
        outage.ok()
        return result
