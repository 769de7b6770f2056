"""Waits: a crowd of coroutines woken with one hand-off to its loop, a wait's own timer, and a
thread's wait ended at once by its stop."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import ExitStack
from typing import Any

import anyio
import anyio.to_thread
import pytest

from service.store.wakeups import JOB_PROGRESS, Listener, StopEvent
from tests.support import thread_wakes_over, wait_for

CROWD = 50
SHORT_S = 0.1  # a wait that must last this long at least: its timer is its only end
IDLE_WINDOW_S = 1.0  # a sleeping wait is watched this long


def test_a_crowds_waiters_are_woken_with_one_hand_off_to_their_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listener = Listener()  # wake-ups delivered by hand, from another thread
    handoffs: list[Any] = []
    delivering = threading.Event()

    def deliver() -> None:
        delivering.set()
        try:
            listener.deliver(JOB_PROGRESS, "job")
        finally:
            delivering.clear()

    async def main() -> tuple[list[bool], bool, bool]:
        loop = asyncio.get_running_loop()
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            if delivering.is_set():  # not the thread pool's own hand-offs
                handoffs.append(args)
            return call_soon_threadsafe(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
        with ExitStack() as stack:
            in_thread = stack.enter_context(listener.subscribe(JOB_PROGRESS, "job"))
            news = [
                stack.enter_context(listener.subscribe_async(JOB_PROGRESS, "job"))
                for _ in range(CROWD)
            ]
            await anyio.to_thread.run_sync(deliver)
            woken = [await n.wait(60) for n in news]
            thread_woken = await anyio.to_thread.run_sync(in_thread.wait, 60)
            # Each wake-up is forgotten once waited for: the next wait times out.
            return woken, thread_woken, await news[0].wait(0)

    woken, thread_woken, again = anyio.run(main)
    assert woken == [True] * CROWD and not again
    assert thread_woken  # a thread's waiter is woken too, directly
    assert len(handoffs) == 1


def test_a_wait_lasts_until_its_timer_and_a_cancelled_wait_leaves_none_behind() -> None:
    listener = Listener()

    async def main() -> tuple[bool, float, bool, float]:
        with listener.subscribe_async(JOB_PROGRESS, "job") as news:
            started = time.monotonic()
            timed_out = await news.wait(SHORT_S)
            waited = time.monotonic() - started
            # A wait cancelled from outside (the stream's client went away): its timer must
            # not end a later wait early.
            with anyio.move_on_after(0.01):
                await news.wait(SHORT_S)
            await anyio.sleep(SHORT_S * 2)
            started = time.monotonic()
            later = await news.wait(SHORT_S)
            return timed_out, waited, later, time.monotonic() - started

    timed_out, waited, later, later_waited = anyio.run(main)
    assert (timed_out, later) == (False, False)
    assert waited >= SHORT_S * 0.9 and later_waited >= SHORT_S * 0.9


def test_a_wake_up_before_the_wait_ends_it_at_once() -> None:
    listener = Listener()

    async def main() -> tuple[bool, bool]:
        with listener.subscribe_async(JOB_PROGRESS, "job") as news:
            listener.deliver(JOB_PROGRESS, "job")  # from the loop's own thread, as tests do
            await anyio.sleep(0)  # the hand-off runs
            return await news.wait(60), await news.wait(0)

    assert anyio.run(main) == (True, False)


def test_a_wake_up_ends_a_wait_in_progress() -> None:
    listener = Listener()

    async def main() -> tuple[bool, bool]:
        with listener.subscribe_async(JOB_PROGRESS, "job") as news:
            async with anyio.create_task_group() as tg:

                async def deliver_soon() -> None:
                    await anyio.sleep(SHORT_S)  # the wait below has begun by then
                    await anyio.to_thread.run_sync(listener.deliver, JOB_PROGRESS, "job")

                tg.start_soon(deliver_soon)
                woken = await news.wait(60)
            return woken, await news.wait(0)

    assert anyio.run(main) == (True, False)


def test_a_thread_s_wait_sleeps_until_its_stop_ends_it() -> None:
    """An idle worker sleeps until a wake-up or its stop (it looked at the stop's flag 10 times
    a second): setting the stop wakes the wait, which reads as not woken (nothing was
    announced)."""
    listener = Listener()
    stop = StopEvent()
    with listener.subscribe(JOB_PROGRESS, "job") as news:
        results: list[bool] = []
        waiting = threading.Thread(target=lambda: results.append(news.wait(600, stop)))
        waiting.start()
        wait_for(lambda: stop.waits == 1, timeout_s=10, what="the wait to begin")
        assert thread_wakes_over(waiting, IDLE_WINDOW_S) <= 3  # the flag's looks: 10
        stop.set()
        waiting.join(timeout=10)
        assert not waiting.is_alive()
        assert results == [False]
        assert stop.waits == 0
        assert news.wait(600, stop) is False  # already stopped: at once


def test_a_wait_given_a_stop_still_wakes_for_news_and_keeps_none() -> None:
    """A stop that is not set changes nothing: the wake-up ends the wait, once."""
    listener = Listener()
    stop = StopEvent()
    with listener.subscribe(JOB_PROGRESS, "job") as news:
        listener.deliver(JOB_PROGRESS, "job")
        assert news.wait(600, stop) is True
        assert news.wait(0, stop) is False  # the wake-up was taken by the wait before
