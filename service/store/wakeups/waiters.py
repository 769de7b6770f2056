"""Waiters and the listener that wakes them: the part of wake-ups that is the same for every
transport. A transport's thread calls :meth:`Listener.deliver`; threads wait on a
:class:`Waiter`, coroutines on an :class:`AsyncWaiter` (woken through their event loop, which
is never blocked)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Self, TypeVar


class StopEvent(threading.Event):
    """A request to stop that also wakes the waits handed it (:meth:`Waiter.wait`).

    An idle worker waits for a wake-up or its stop. It used to look at a plain event's flag 10
    times a second: on a host where an idle process's memory goes cold, each look cost
    milliseconds of CPU (docs/benchmarks.md, Time to result). Setting this event wakes the waits
    instead, so an idle thread sleeps until something happens.
    """

    def __init__(self) -> None:
        super().__init__()
        self._wakers_lock = threading.Lock()
        self._wakers: set[Callable[[], None]] = set()

    def set(self) -> None:
        """Set the flag, then wake every wait begun on it."""
        super().set()
        with self._wakers_lock:
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    @property
    def waits(self) -> int:
        """How many waits a :meth:`set` would wake now (for tests)."""
        with self._wakers_lock:
            return len(self._wakers)

    @contextmanager
    def waking(self, wake: Callable[[], None]) -> Iterator[None]:
        """``wake()`` is called if the event is set while the block runs (or already was)."""
        with self._wakers_lock:
            self._wakers.add(wake)
        try:
            if self.is_set():
                wake()  # set before the waker was in the set: :meth:`set` did not call it
            yield
        finally:
            with self._wakers_lock:
                self._wakers.discard(wake)


class Waiter:
    """One thread's wait for a topic/key. A wake-up that arrives while nobody waits is kept
    until the next :meth:`wait`, so that one published between a look at the database and
    the wait that follows it is not lost."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        """Called by the listener's thread."""
        self._event.set()

    def wait(self, timeout: float, stop: StopEvent | None = None) -> bool:
        """Until woken (True), ``timeout`` passes or ``stop`` is set (False); then forget the
        wake-up: the caller looks at the database next, and sees what it announced."""
        with contextlib.nullcontext() if stop is None else stop.waking(self._event.set):
            woke = self._event.wait(timeout) and not (stop is not None and stop.is_set())
        self._event.clear()
        return woke


class AsyncWaiter:
    """A coroutine's wait for a topic/key, on the event loop it was made in.

    A wait ends at the wake-up or at a timer the loop sets off (one handle, cancelled once the
    wait is over), not in a cancel scope: every open event stream waits here between its polls,
    and a scope's entry, deadline and exit cost a crowd's streams more than their waits did
    (docs/benchmarks.md).
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._woke = False

    def wake(self) -> None:
        """Called by the listener's thread: the waiter is woken in the loop's own thread."""
        _wake_on_loop(self.loop, [self])

    def woken(self) -> None:
        """The wake-up, in the loop's thread."""
        self._woke = True
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """As :meth:`Waiter.wait`, without blocking the loop."""
        if not self._event.is_set():
            timer = self.loop.call_later(timeout, self._event.set)
            try:
                await self._event.wait()
            finally:
                timer.cancel()
                if not self._woke:  # the timer's, perhaps set as the wait was cancelled
                    self._event.clear()
        woke, self._woke = self._woke, False
        self._event.clear()
        return woke


def _wake_on_loop(loop: asyncio.AbstractEventLoop, waiters: list[AsyncWaiter]) -> None:
    """Wake ``waiters``, all of ``loop``, in its thread: one hand-off for all of them."""

    def woken() -> None:
        for waiter in waiters:
            waiter.woken()

    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
        loop.call_soon_threadsafe(woken)


def wake(waiters: list[Waiter | AsyncWaiter]) -> None:
    """Wake every waiter; those of one event loop with one hand-off to its thread (a job's
    crowd of streams is woken at once, not one call across threads each)."""
    loops: dict[asyncio.AbstractEventLoop, list[AsyncWaiter]] = {}
    for waiter in waiters:
        if isinstance(waiter, AsyncWaiter):
            loops.setdefault(waiter.loop, []).append(waiter)
        else:
            waiter.wake()
    for loop, group in loops.items():
        _wake_on_loop(loop, group)


W = TypeVar("W", Waiter, AsyncWaiter)


class Listener:
    """A process's waiters by topic and key, woken by what a transport receives.

    This base class receives nothing: its waiters only time out, which is plain polling
    (wake-ups off, or no transport for the database).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[tuple[str, str], set[Waiter | AsyncWaiter]] = {}
        # Per topic/key waited for: a number taken from one count at its last wake-up (or when
        # its first waiter came), so it changes with every wake-up and never comes back.
        self._count = itertools.count(1)
        self._generations: dict[tuple[str, str], int] = {}
        self.connected = threading.Event()  # set while wake-ups can arrive (for tests, logs)

    def generation(self, topic: str, key: str = "") -> int | None:
        """A number that changes whenever ``topic``/``key`` gets a wake-up, None while nobody
        waits for it. Two readings alike: no wake-up arrived in between, so a read begun after
        the first holds every write announced before the second
        (:class:`service.domain.event_reads.SharedReads`)."""
        with self._lock:
            return self._generations.get((topic, key))

    def deliver(self, topic: str, key: str) -> None:
        """Wake the waiters of ``topic``/``key`` (the transport's thread), its generation
        changed first."""
        with self._lock:
            waiters = list(self._waiters.get((topic, key), ()))
            if waiters:
                self._generations[(topic, key)] = next(self._count)
        wake(waiters)

    def deliver_all(self) -> None:
        """Wake every waiter: wake-ups may have been missed (the transport was down)."""
        with self._lock:
            waiters = [w for group in self._waiters.values() for w in group]
            number = next(self._count)
            self._generations = dict.fromkeys(self._waiters, number)
        wake(waiters)

    @contextmanager
    def subscribe(self, topic: str, key: str = "") -> Iterator[Waiter]:
        """A thread's waiter for ``topic``/``key`` while the block runs."""
        with self._holding(Waiter(), topic, key) as waiter:
            yield waiter

    @contextmanager
    def subscribe_async(self, topic: str, key: str = "") -> Iterator[AsyncWaiter]:
        """A coroutine's waiter (made in the running loop) while the block runs."""
        with self._holding(AsyncWaiter(), topic, key) as waiter:
            yield waiter

    @contextmanager
    def _holding(self, waiter: W, topic: str, key: str) -> Iterator[W]:
        with self._lock:
            if (topic, key) not in self._waiters:
                self._generations[(topic, key)] = next(self._count)
            self._waiters.setdefault((topic, key), set()).add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                group = self._waiters.get((topic, key), set())
                group.discard(waiter)
                if not group:
                    self._waiters.pop((topic, key), None)
                    self._generations.pop((topic, key), None)

    def close(self) -> None:
        """Stop receiving; the base class holds nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()
