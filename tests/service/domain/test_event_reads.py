"""A job's streams woken by one wake-up read once between them, and never miss a write."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from types import SimpleNamespace
from typing import TypeVar, cast

import anyio
import pytest
from fastapi.sse import ServerSentEvent
from sqlalchemy.orm import Session, sessionmaker

from service.domain import event_reads, events
from service.domain.event_reads import News, Position, SessionReads, SharedReads
from service.domain.events import Cursor
from service.schemas import JobCreate
from service.store import job_repo, wakeups
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


def job_now(sessions: sessionmaker[Session], job_id: str) -> SimpleNamespace:
    """The job's row as a stream opening now reads it (the route's :func:`events.opening_row`),
    read apart from the counted reads."""
    with sessions() as session:
        job = job_repo.job_row(session, job_id)
    assert job is not None
    return job


def follower(
    reads: CountedReads,
    job_id: str,
    listener: wakeups.Listener | None,
    shared: SharedReads | None,
    cursor: Cursor | None = None,
) -> Stream:
    """A stream of the job from its start (or ``cursor``), opened now: it runs only while the
    test awaits it."""
    opened = job_now(reads.sessions, job_id)
    stream = events.batches(
        reads,
        job_id,
        cursor or Cursor(),
        poll_s=POLL_S,
        wake=listener,
        shared=shared,
        opened=opened,
    )
    return cast(Stream, stream)


def followers(
    reads: CountedReads, job_id: str, listener: wakeups.Listener | None, shared: SharedReads
) -> tuple[Stream, Stream]:
    """Two streams of the job from its start, opened together."""
    return follower(reads, job_id, listener, shared), follower(reads, job_id, listener, shared)


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
    elsewhere = Position(1, 0, 5, 1000)
    assert shared.get("j", elsewhere, 7, after=0) is None  # another place
    assert shared.get("k", at, 7, after=0) is None
    assert shared.get("j", at, None, after=0) is None  # nobody listens: no generation to go by
    unkept = shared.keep("j", at, None, news)  # ordered, never kept without a generation
    assert unkept.order > kept.order
    assert shared.get("j", at, 7, after=0) is kept and shared.reused == 2
    # A stream's first poll: only a read that saw the job's row as the stream's opening did.
    assert shared.get("j", at, 7, after=0, like=SimpleNamespace(status="queued")) is None
    row = SimpleNamespace(status="running")
    seen = shared.keep("j", at, 7, News(row))
    assert shared.get("j", at, 7, after=0, like=SimpleNamespace(status="running")) is seen
    assert shared.get("j", at, 7, after=0, like=SimpleNamespace(status="queued")) is None
    # Each place keeps its own read: streams a write behind share theirs, and leave the others'.
    behind = shared.keep("j", elsewhere, 7, news)
    assert shared.get("j", elsewhere, 7, after=0) is behind
    assert shared.get("j", at, 7, after=0) is seen
    # Bounded: past its places, the read least recently kept or taken goes.
    few = SharedReads(places=2)
    reads_kept = [few.keep("j", Position(1, 0, n, 1000), 7, news) for n in range(3)]
    assert few.get("j", Position(1, 0, 0, 1000), 7, after=0) is None
    assert few.get("j", Position(1, 0, 2, 1000), 7, after=0) is reads_kept[2]


def test_a_first_poll_takes_a_kept_read_only_if_it_saw_the_job_as_the_stream_opened(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    # A write whose wake-up has not reached this process (lost, or still on its way) may have
    # reached a client through another process: a stream that opens after it must not be sent
    # the job as it was before, though no wake-up here says that the kept read is old.
    job_id = training.job_id
    listener, shared, reads = wakeups.Listener(), SharedReads(), LoopReads(sessions)

    async def main() -> None:
        a = follower(reads, job_id, listener, shared)
        assert [e.event for e in await anext(a)] == ["status"]
        b = follower(reads, job_id, listener, shared)  # the job as a's read saw it: a's read
        assert wire_view(await anext(b)) == wire_view(
            await anext(follower(reads, job_id, None, None))
        )
        assert (reads.count, shared.reused) == (2, 1)
        training.finish()  # its wake-up never comes
        c = follower(reads, job_id, listener, shared)
        sent = await anext(c)
        assert (reads.count, shared.reused) == (3, 1)  # its own read
        final = json.loads(sent[-1].raw_data or "")
        assert final["status"] == "succeeded" and final["final"] is True
        for stream in (a, b):
            await stream.aclose()

    anyio.run(main)


def test_what_is_built_from_a_read_is_built_once_for_each_way_of_standing() -> None:
    kept = SharedReads().keep("j", Position(1, 0, 4, 1000), 7, News(None))
    calls: list[str] = []

    def build(name: str) -> Callable[[], list[str]]:
        def made() -> list[str]:
            calls.append(name)
            return [name]

        return made

    first = kept.once(("here", 3), build("a"))
    assert kept.once(("here", 3), build("b")) is first  # stood alike: the same, not rebuilt
    assert kept.once(("here", 4), build("c")) == ["c"]  # stood otherwise: its own
    assert calls == ["a", "c"]
    # Bounded: past BUILT_PER_READ ways, what is built is not kept (built again when asked).
    for n in range(event_reads.BUILT_PER_READ):
        kept.once(("other", n), build(f"o{n}"))
    kept.once(("other", event_reads.BUILT_PER_READ - 1), build("again"))
    assert calls[-1] == "again" and len(kept.built) == event_reads.BUILT_PER_READ


def test_streams_woken_by_one_wake_up_read_once_and_miss_no_write(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    job_id = training.job_id
    listener, shared, reads = wakeups.Listener(), SharedReads(), LoopReads(sessions)

    def announce() -> None:
        listener.deliver(wakeups.JOB_PROGRESS, job_id)

    async def main() -> None:
        a, b = followers(reads, job_id, listener, shared)
        # The second stream's first poll takes the first's read: it subscribed before it asked,
        # and no wake-up came in between.
        assert [e.event for e in await anext(a)] == [e.event for e in await anext(b)] == ["status"]
        assert (reads.count, shared.reused) == (1, 1)

        # One write, announced: the first stream woken reads it, the second takes that read.
        training.advance(2)
        announce()
        assert steps_in(await anext(a)) == steps_in(await anext(b)) == [1, 2]
        assert (reads.count, shared.reused) == (2, 2)

        # A write announced after the first stream's read: the second reads for itself.
        training.advance(1)
        announce()
        assert steps_in(await anext(a)) == [3]
        training.advance(1)
        announce()
        assert steps_in(await anext(b)) == [3, 4]
        assert (reads.count, shared.reused) == (4, 2)
        assert steps_in(await anext(a)) == [4]  # woken by the second wake-up: read at its place
        assert (reads.count, shared.reused) == (5, 2)

        # A write whose wake-up was lost: a woken stream may take a read made before it, but the
        # fallback poll (not woken) reads for itself, and sees it.
        training.advance(1)
        announce()
        assert steps_in(await anext(a)) == [5]
        training.advance(1)  # never announced
        assert steps_in(await anext(b)) == [5]  # woken by the last wake-up: a's read
        assert (reads.count, shared.reused) == (6, 3)
        assert steps_in(await anext(b)) == [6]  # after POLL_S, not woken: its own read
        assert steps_in(await anext(a)) == [6]
        assert reads.count == 8 and shared.reused == 3
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


def wire_view(batch: list[ServerSentEvent]) -> list[tuple[str | None, str | None, str | None]]:
    """What a client is sent of a batch (the event, its data and its id; the reconnection delay
    is the wire's)."""
    return [(e.event, e.raw_data, e.id) for e in batch]


def test_streams_that_share_send_what_each_would_have_sent_alone(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    # The differential test of sharing: streams that take each other's reads and events send,
    # batch by batch, what a stream that shares nothing sends from the same place, and the
    # events they share are the same objects (built once). One stream resumes half way from the
    # first one's last event id, just after the first has read and built at that place: it
    # takes the first's read, but it has sent no status yet, so its events are its own (an
    # opening status first), as a lone stream's are.
    job_id = training.job_id
    listener, shared, reads = wakeups.Listener(), SharedReads(), LoopReads(sessions)

    def stream(cursor: Cursor, *, share: bool) -> Stream:
        return follower(reads, job_id, listener, shared if share else None, cursor)

    async def main() -> None:
        a, b, lone = (stream(Cursor(), share=share) for share in (True, True, False))
        pairs = [(b, lone)]  # each stream beside the lone one that stands where it does
        first = [await anext(s) for s in (a, b, lone)]
        assert wire_view(first[0]) == wire_view(first[1]) == wire_view(first[2])
        writes: list[Callable[[], None]] = [
            lambda: training.advance(2),
            lambda: training.advance(3, end_epoch=0.8),
            lambda: training.advance(2),
            lambda: training.advance(3, end_epoch=0.9),
            training.finish,
        ]
        a_sent = [first[0]]
        for n, write in enumerate(writes):
            write()
            listener.deliver(wakeups.JOB_PROGRESS, job_id)
            sent = await anext(a)
            resuming = []
            if n == 2:  # from the id a had before this poll: a's read was made at that place
                last = Cursor.parse(a_sent[-1][-1].id)
                resuming = [stream(last, share=share) for share in (True, False)]
                reused = shared.reused
                opening = await anext(resuming[0])
                assert shared.reused == reused + 1  # a's read, taken at a's place
                assert opening[0].event == "status"
                assert wire_view(opening) == wire_view(await anext(resuming[1]))
            got = {id(s): await anext(s) for pair in pairs for s in pair}
            assert wire_view(sent) == wire_view(got[id(lone)])
            assert got[id(b)] is sent  # b took a's read and a's events
            for sharing, alone in pairs:
                assert wire_view(got[id(sharing)]) == wire_view(got[id(alone)])
            a_sent.append(sent)
            if resuming:
                pairs.append((resuming[0], resuming[1]))
        assert a_sent[-1][-1].id is not None and a_sent[-1][-1].id.endswith(":end")
        for s in (a, *(s for pair in pairs for s in pair)):
            with pytest.raises(StopAsyncIteration):
                await anext(s)

    anyio.run(main)
