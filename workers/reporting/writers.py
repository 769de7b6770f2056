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

from concurrent.futures import ThreadPoolExecutor


class Writers:
    """A flush thread and a training-state thread, started at their first write."""

    def __init__(self) -> None:
        self.flushes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush")
        self.states = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resume-state")

    def shutdown(self) -> None:
        """Wait for what was handed over, then let the threads go."""
        self.flushes.shutdown(wait=True)
        self.states.shutdown(wait=True)
