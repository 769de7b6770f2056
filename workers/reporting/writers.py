"""The writing threads behind the training loop: one for flushes, one for training states.

A worker makes one :class:`Writers` and every reporter it starts writes through it, so the
jobs of a pack (:mod:`workers.packed`) share two threads instead of holding two each. Eight
reporters with threads of their own became due together and raced for SQLite's one write lock
(each loser sleeping in the busy handler), beside two training threads on two cores: a sweep
of 8 took a median ~2.3 s against ~1.95 s with shared threads (docs/benchmarks.md). One
thread of each kind writes them one after another, in the order they were handed over, which
keeps every job's own order: its flushes in turn, its states in turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Activity:
    """Whether the writing threads (flushes, training states) worked at any moment of an
    interval.

    The thread tuner must not time a training step that ran beside the worker's own writes: a
    write's serialising, its driver and (PostgreSQL) its server process take a core for a few
    milliseconds, which stalls two training threads far more than one, so a few such steps made
    the tuner drop to one thread for the next seconds of training, though the write was over
    (docs/benchmarks.md). Those stalls come whatever the count, and end with the write.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._changes = 0  # each write's start and end

    def mark(self) -> int:
        """A mark for :meth:`quiet_since`: now."""
        return self._changes

    def quiet_since(self, mark: int) -> bool:
        """Whether no write ran at any moment since ``mark`` (one running at the mark has to
        end, which changes the count, or is still running)."""
        with self._lock:  # both as of one moment
            return self._changes == mark and self._running == 0

    def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` as a write."""
        with self._lock:
            self._running += 1
            self._changes += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._running -= 1
                self._changes += 1


class _Writer(ThreadPoolExecutor):
    """One writing thread whose tasks count as the worker's writes (:class:`Activity`)."""

    def __init__(self, name: str, activity: Activity) -> None:
        super().__init__(max_workers=1, thread_name_prefix=name)
        self._activity = activity

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return super().submit(self._activity.run, fn, *args, **kwargs)


class Writers:
    """A flush thread and a training-state thread, started at their first write."""

    def __init__(self) -> None:
        self.activity = Activity()
        self.flushes: ThreadPoolExecutor = _Writer("flush", self.activity)
        self.states: ThreadPoolExecutor = _Writer("resume-state", self.activity)

    def shutdown(self) -> None:
        """Wait for what was handed over, then let the threads go."""
        self.flushes.shutdown(wait=True)
        self.states.shutdown(wait=True)
