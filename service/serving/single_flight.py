"""Concurrent calls for the same key share one computation (loading a model, resolving a choice)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """While one thread computes a key's value, other threads asking for that key wait for it.

    Computations of different keys run in parallel. A failure reaches every waiter and is not
    remembered: the next call computes again. Callers that cache the value should store it
    inside ``compute`` and look it up there first, so that a call arriving just after a
    computation finished finds its value rather than computing it again.
    """

    def __init__(self) -> None:
        self._pending: dict[K, Future[V]] = {}
        self._waiting: dict[K, int] = {}
        self._lock = threading.Lock()

    def waiting(self, key: K) -> int:
        """How many calls are waiting for the computation of ``key`` under way."""
        with self._lock:
            return self._waiting.get(key, 0)

    def run(self, key: K, compute: Callable[[], V]) -> V:
        """``compute()``, or the result of the call for ``key`` already under way."""
        with self._lock:
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
            else:
                self._waiting[key] = self._waiting.get(key, 0) + 1
        if not owner:
            try:
                return pending.result()
            finally:
                with self._lock:
                    self._waiting[key] -= 1
                    if not self._waiting[key]:
                        del self._waiting[key]
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
        pending.set_result(value)
        return value
