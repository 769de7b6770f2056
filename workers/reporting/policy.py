"""When a worker stops a job on its own account: cancel asked, runtime passed, shutdown.

Kept apart from the loop and the writes: the reporter asks :meth:`StopPolicy.check` after
each flush, which raises the exception that says how the job ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import CancelRequested


class Shutdown(Exception):
    """The worker was asked to stop; the job goes back to the queue."""


class StorageFailed(Exception):
    """A checkpoint or training state could not be written (permissions, a full disk).

    A fault of the worker's host, not of the job: the job goes back to the queue as its next
    attempt. The message is the one clients read, so it names no path; the cause is chained.
    """


class Diverged(Exception):
    """A step's loss was not finite; training cannot meaningfully go on."""


class RuntimeLimitExceeded(Exception):
    """The job ran longer than its ``max_runtime_s``."""


@dataclass(frozen=True)
class Limits:
    """When a worker stops a job on its own account."""

    lease_s: float
    flush_interval_s: float
    max_runtime_s: float | None = None  # fail the job past this
    shutdown_grace_s: float = 30.0  # after a stop request, finish the epoch within this


class StopPolicy:
    """Raises the reason a job must stop now, if there is one."""

    def __init__(
        self, *, job_id: str, limits: Limits, stop: threading.Event, clock: Callable[[], float]
    ) -> None:
        self._job_id = job_id
        self._limits = limits
        self._stop = stop
        self._started = clock()
        self._stop_seen_at: float | None = None

    def check(self, *, cancel_requested: bool, now: float) -> None:
        """After a flush: cancel, then the runtime limit, then a shutdown past its grace."""
        if cancel_requested:
            raise CancelRequested(f"job {self._job_id} was cancelled")
        limit = self._limits.max_runtime_s
        if limit is not None and now - self._started > limit:
            raise RuntimeLimitExceeded(f"the job ran longer than its max_runtime_s of {limit:g} s")
        if self._stop.is_set():
            if self._stop_seen_at is None:
                self._stop_seen_at = now
            if now - self._stop_seen_at >= self._limits.shutdown_grace_s:
                raise Shutdown("worker is shutting down; the epoch did not end within the grace")

    def at_epoch_end(self, epoch: int, epochs: int) -> None:
        """A stop request waits for an epoch's end: the job goes back with that epoch kept."""
        if self._stop.is_set() and epoch < epochs:
            raise Shutdown("worker is shutting down; the job resumes after this epoch")
