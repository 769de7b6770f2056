"""A job's streams woken by one wake-up read once between them, and never miss a write."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar, cast

import anyio
import pytest
from fastapi.sse import ServerSentEvent
from sqlalchemy.orm import Session, sessionmaker

from service.domain import events
from service.domain.event_reads import News, Position, SessionReads, SharedReads
from service.domain.events import Cursor
from service.schemas import JobCreate
from service.store import wakeups
from service.store.engines import Reader
from tests.records import FakeTraining

PARAMS = JobCreate(epochs=2, batch_size=10, trainset_size=50, testset_size=10)  # 5 steps/epoch
T = TypeVar("T")
# Short: the fallback poll of a stream that no wake-up reached is part of what is tested; the
# streams only wait while the test awaits their next batch.
POLL_S = 0.2


class CountedReads(SessionReads):
    """Reads in a thread each, in sessions of their own, counted."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        super().__init__(sessions)
        self.count = 0

    async def read(self, read: Callable[[Reader], T]) -> T:
        self.count += 1
        return await super().read(read)


class LoopReads(CountedReads):
    """Reads on the event loop, one at a time, as the API's are on SQLite (PollReads)."""

    loop_steps = 1000

    async def read(self, read: Callable[[Reader], T]) -> T:
        self.count += 1
        with self.sessions() as session:
            return read(session)


@pytest.fixture
def training(sessions: sessionmaker[Session]) -> FakeTraining:
    """A job claimed by a (fake) worker, its steps to come."""
    training = FakeTraining(sessions, PARAMS)
    training.submit()
    training.claim()
    return training


Stream = AsyncGenerator[list[ServerSentEvent], None]


def followers(
    reads: CountedReads, job_id: str, listener: wakeups.Listener | None, shared: SharedReads
) -> tuple[Stream, Stream]:
    """Two streams of the job from its start (they run only while the test awaits them)."""

    def follower() -> Stream:
        stream = events.batches(
            reads, job_id, Cursor(), poll_s=POLL_S, wake=listener, shared=shared
        )
        return cast(Stream, stream)

    return follower(), follower()


def steps_in(batch: list[ServerSentEvent]) -> list[int]:
    return [
        int(step["step"])
        for event in batch
        if event.event == "step" and event.raw_data is not None
        for step in json.loads(event.raw_data)["steps"]
    ]


def test_a_read_is_shared_at_the_same_place_and_generation_and_only_if_newer() -> None:
    shared = SharedReads()
    at, news = Position(1, 0, 4, 1000), News(None)
    kept = shared.keep("j", at, 7, news)
    assert shared.get("j", at, 7, after=0) is kept and shared.reused == 1
    # Not newer than the asking stream's last read: its job's status must never go back.
    assert shared.get("j", at, 7, after=kept.order) is None
    assert shared.get("j", at, 8, after=0) is None  # a wake-up arrived since that read began
    assert shared.get("j", Position(1, 0, 5, 1000), 7, after=0) is None  # another place
    assert shared.get("k", at, 7, after=0) is None
    assert shared.get("j", at, None, after=0) is None  # nobody listens: no generation to go by
    unkept = shared.keep("j", at, None, news)  # ordered, never kept without a generation
    assert unkept.order > kept.order
    assert shared.get("j", at, 7, after=0) is kept and shared.reused == 2


def test_streams_woken_by_one_wake_up_read_once_and_miss_no_write(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    job_id = training.job_id
    listener, shared, reads = wakeups.Listener(), SharedReads(), LoopReads(sessions)

    def announce() -> None:
        listener.deliver(wakeups.JOB_PROGRESS, job_id)

    async def main() -> None:
        a, b = followers(reads, job_id, listener, shared)
        # Each stream's first poll reads for itself: no wake-up brought it.
        assert [e.event for e in await anext(a)] == [e.event for e in await anext(b)] == ["status"]
        assert (reads.count, shared.reused) == (2, 0)

        # One write, announced: the first stream woken reads it, the second takes that read.
        training.advance(2)
        announce()
        assert steps_in(await anext(a)) == steps_in(await anext(b)) == [1, 2]
        assert (reads.count, shared.reused) == (3, 1)

        # A write announced after the first stream's read: the second reads for itself.
        training.advance(1)
        announce()
        assert steps_in(await anext(a)) == [3]
        training.advance(1)
        announce()
        assert steps_in(await anext(b)) == [3, 4]
        assert (reads.count, shared.reused) == (5, 1)
        assert steps_in(await anext(a)) == [4]  # woken by the second wake-up: read at its place
        assert (reads.count, shared.reused) == (6, 1)

        # A write whose wake-up was lost: a woken stream may take a read made before it, but the
        # fallback poll (not woken) reads for itself, and sees it.
        training.advance(1)
        announce()
        assert steps_in(await anext(a)) == [5]
        training.advance(1)  # never announced
        assert steps_in(await anext(b)) == [5]  # woken by the last wake-up: a's read
        assert (reads.count, shared.reused) == (7, 2)
        assert steps_in(await anext(b)) == [6]  # after POLL_S, not woken: its own read
        assert steps_in(await anext(a)) == [6]
        assert reads.count == 9 and shared.reused == 2
        for stream in (a, b):
            await stream.aclose()

    anyio.run(main)


@pytest.mark.parametrize("case", ["reads in threads", "no listener"])
def test_reads_in_threads_or_without_a_listener_share_nothing(
    sessions: sessionmaker[Session], training: FakeTraining, case: str
) -> None:
    # Two reads in threads may overlap, and the one kept last need not be the newer: each
    # stream reads for itself (and builds its events in the thread, off the loop). And the
    # generations are the listener's: a stream given none (a private one that never wakes) has
    # nothing to compare a kept read with.
    threads = case == "reads in threads"
    reads = CountedReads(sessions) if threads else LoopReads(sessions)
    listener, shared = (wakeups.Listener() if threads else None), SharedReads()

    async def main() -> None:
        a, b = followers(reads, training.job_id, listener, shared)
        await anext(a)
        await anext(b)
        training.advance(2)
        if listener is not None:
            listener.deliver(wakeups.JOB_PROGRESS, training.job_id)
        assert steps_in(await anext(a)) == steps_in(await anext(b)) == [1, 2]
        for stream in (a, b):
            await stream.aclose()

    anyio.run(main)
    assert (reads.count, shared.reused) == (4, 0)
