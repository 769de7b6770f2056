"""Concurrent calls for the same key share one computation (loading a model, resolving a choice)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """While one computation of a key runs, every caller asking for that key awaits it.

    Callers wait on the event loop, not in threads: a hundred predict requests for a model
    being loaded hold the one thread that reads its file, and the thread pool stays free for
    everything else (``compute`` itself may hand its blocking part to a thread).

    The computation is a task of its own, not the first caller's: a caller that goes away
    (its client hung up) neither cancels it nor fails the others. Computations of different
    keys run in parallel. A failure reaches every waiter and is not remembered: the next call
    computes again. Callers that cache the value should store it inside ``compute``, so that
    the value is in the cache by the time the key leaves :meth:`waiting`.

    Not thread-safe: use it from one event loop (the API process's).
    """

    def __init__(self) -> None:
        self._pending: dict[K, asyncio.Task[V]] = {}
        self._waiting: dict[K, int] = {}

    def waiting(self, key: K) -> int:
        """How many calls are waiting for the computation of ``key`` under way."""
        return self._waiting.get(key, 0)

    async def run(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        """``await compute()``, or the result of the computation for ``key`` under way."""
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._compute(key, compute))
            task.add_done_callback(_retrieve)
            self._pending[key] = task
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            # shield: a waiter's cancellation ends its own wait, never the shared computation.
            return await asyncio.shield(task)
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    async def _compute(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        try:
            return await compute()
        finally:
            # In the same step as the result: a call after this one computes afresh.
            del self._pending[key]


def _retrieve(task: asyncio.Task[V]) -> None:
    # Every waiter may have gone: mark a failure as seen so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()
