"""Decode slots: at most ``slots`` decodes at once, on threads or inline, and a bounded wait."""

from __future__ import annotations

import threading
import time
from functools import partial

import anyio
import pytest

from service.errors import TooManyRequests
from service.serving.decode_slots import DecodeSlots, release_freed_memory
from tests.support import wait_until


class InFlight:
    """A fake slow decode that counts how many run at the same moment."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = 0
        self.peak = 0
        self.done = 0
        self._lock = threading.Lock()

    def decode(self) -> int:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.seconds)
        with self._lock:
            self.now -= 1
            self.done += 1
        return 7


@pytest.mark.parametrize("slots", [1, 3])
def test_no_more_than_the_slots_decode_at_once(slots: int) -> None:
    fake = InFlight(0.05)

    async def main() -> None:
        decodes = DecodeSlots(slots, max_waiting=100)
        async with anyio.create_task_group() as tasks:
            for _ in range(12):
                tasks.start_soon(decodes.run, fake.decode)

    anyio.run(main)
    assert fake.done == 12
    assert fake.peak == slots  # never more, and the slots are used


def test_inline_decodes_share_the_slots_with_threaded_ones() -> None:
    fake = InFlight(0.1)
    loop_turns = 0

    async def main() -> None:
        nonlocal loop_turns
        decodes = DecodeSlots(1, max_waiting=100)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(decodes.run, fake.decode)  # on a thread: holds the one slot
            await wait_until(lambda: fake.now == 1, timeout_s=5, what="the threaded decode")
            tasks.start_soon(lambda: decodes.run(fake.decode, inline=True))
            # The inline one waits without blocking the loop: it keeps turning meanwhile.
            while fake.done == 0:
                loop_turns += 1
                await anyio.sleep(0.005)

    anyio.run(main)
    assert fake.done == 2 and fake.peak == 1
    assert loop_turns >= 5


def test_beyond_the_waiting_bound_requests_get_429_with_retry_after() -> None:
    fake = InFlight(0.2)
    refused: list[TooManyRequests] = []

    async def main() -> None:
        decodes = DecodeSlots(2, max_waiting=3)

        async def one() -> None:
            try:
                await decodes.run(fake.decode)
            except TooManyRequests as exc:
                refused.append(exc)

        async with anyio.create_task_group() as tasks:
            for _ in range(5):
                tasks.start_soon(one)
            await wait_until(lambda: decodes.waiting == 3, timeout_s=5, what="3 waiting")
            assert decodes.busy == 2
            for _ in range(2):
                tasks.start_soon(one)

    anyio.run(main)
    assert fake.done == 5 and len(refused) == 2
    assert refused[0].status_code == 429 and refused[0].headers == {"Retry-After": "1"}
    assert "2 images are being decoded and 3 more wait" in refused[0].message


def test_a_later_image_of_a_request_let_in_waits_its_turn_past_the_bound() -> None:
    """A form's second image queues again behind those that came meanwhile: refusing it 429
    would throw away the request whose first image was already decoded."""
    fake = InFlight(0.2)
    refused: list[TooManyRequests] = []

    async def main() -> None:
        decodes = DecodeSlots(1, max_waiting=1)

        async def one(*, admitted: bool) -> None:
            try:
                await decodes.run(fake.decode, admitted=admitted)
            except TooManyRequests as exc:
                refused.append(exc)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(partial(one, admitted=False))
            tasks.start_soon(partial(one, admitted=False))
            await wait_until(lambda: decodes.waiting == 1, timeout_s=5, what="one waiting")
            tasks.start_soon(partial(one, admitted=True))  # past the bound, and waits
            await wait_until(lambda: decodes.waiting == 2, timeout_s=5, what="two waiting")
            tasks.start_soon(partial(one, admitted=False))  # a new request: refused

    anyio.run(main)
    assert fake.done == 3 and len(refused) == 1


def test_freed_memory_is_released_without_error() -> None:
    release_freed_memory()  # glibc's malloc_trim here; nothing where there is none
    release_freed_memory()
