"""Bounded image decoding: a few decodes at a time, a bounded wait, freed memory given back.

Decoding a large upload takes a core and tens of MB for a while; with nothing but the thread
pool to bound them, a burst of large images multiplied both by the pool's size. Every predict
path decodes through :meth:`DecodeSlots.run` (``Predictor.images_tensor``), which lets at most
``slots`` images decode at once, each request's images one at a time in their turn (a form of
16 large images held a slot through all of them, and a small request waited for the form).
The wait is an ``anyio.CapacityLimiter`` (first come, first served): a waiting request is a
suspended task, neither a blocked event loop nor a held thread, and decodes run on threads of
their own limiter, so they never take the threads that the rest of the API uses. Past
``max_waiting`` waiting requests a new one is refused at once with 429 and ``Retry-After`` (as
``POST /jobs`` is past its queue), so waits stay short and the bodies held by waiting requests
stay bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache
from typing import TypeVar

import anyio
import anyio.to_thread

from service.errors import TooManyRequests

T = TypeVar("T")

RETRY_AFTER_S = 1  # a decode takes well under a second, and the queue moves at `slots` a time


class DecodeSlots:
    """At most ``slots`` decodes at once; at most ``max_waiting`` requests waiting for one."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self._limiter = anyio.CapacityLimiter(slots)
        self.max_waiting = max_waiting

    @property
    def busy(self) -> int:
        """Decodes under way."""
        return int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._limiter.statistics().tasks_waiting

    async def run(
        self, decode: Callable[[], T], *, inline: bool = False, admitted: bool = False
    ) -> T:
        """``decode()`` in a slot: on a thread, or on the event loop when ``inline`` (images so
        small that a thread hand-off costs more than the decode: the fast lane's).

        Raises 429 when all slots are busy and ``max_waiting`` requests already wait, unless
        ``admitted``: a later image of a request let in with its first waits its turn.
        """
        busy = self._limiter.available_tokens == 0
        if busy and not admitted and self.waiting >= self.max_waiting:
            raise TooManyRequests(
                f"{self.busy} images are being decoded and {self.waiting} more wait; "
                f"retry in {RETRY_AFTER_S} s",
                retry_after_s=RETRY_AFTER_S,
            )
        if inline:
            try:  # a free slot is taken without yielding to the loop: the lane's fast path
                self._limiter.acquire_nowait()
            except anyio.WouldBlock:
                await self._limiter.acquire()
            try:
                return decode()
            finally:
                self._limiter.release()
        return await anyio.to_thread.run_sync(decode, limiter=self._limiter)


def release_freed_memory() -> None:
    """Hand memory that was freed back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps what a thread freed in that thread's arena for reuse, so without this the
    process stays at its peak after a burst of large decodes. Called after those only: it
    walks every arena, which is cheap next to a large decode but not next to a small one.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: musl, macOS, Windows
        return None
    return trim
