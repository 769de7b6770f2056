"""The event stream's polls on both backends: order, batching, ids, resume, retries, the end;
read in a session of their own, and through the polls' connections as the API reads them."""

from __future__ import annotations

import json
import math
import random
import re
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.sse import ServerSentEvent, format_sse_event
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from service import sse
from service.api.lanes.polls import PollReads
from service.domain import event_reads, events
from service.domain.events import Cursor, StreamState
from service.errors import InvalidInput
from service.schemas import JobCreate
from service.status import JobStatus
from service.store import metric_repo, wakeups
from service.store.tables import Job
from tests.records import FakeTraining, lapse_leases

PARAMS = JobCreate(epochs=2, batch_size=10, trainset_size=50, testset_size=10)  # 5 steps/epoch


def poll(sessions: sessionmaker[Session], state: StreamState) -> tuple[list[sse.Event], bool]:
    with sessions() as session:
        result = events.poll(session, state)
    return [read(e) for e in result.events], result.done


def read(event: ServerSentEvent) -> sse.Event:
    """An event as a client reads it (FastAPI writes ``raw_data`` as it is)."""
    assert event.event is not None and event.raw_data is not None and event.data is None
    return sse.Event(event.event, event.raw_data, event.id)


async def stream(
    reads: event_reads.StreamReads,
    job_id: str,
    cursor: Cursor,
    *,
    poll_s: float,
    wake: wakeups.Listener | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The events of :func:`events.batches`, one at a time."""
    async for batch in events.batches(reads, job_id, cursor, poll_s=poll_s, wake=wake):
        for event in batch:
            yield event


def kinds(evs: list[sse.Event]) -> list[str]:
    return [e.event for e in evs]


def steps_of(evs: list[sse.Event]) -> list[int]:
    return [s["step"] for e in evs if e.event == "step" for s in e.json()["steps"]]


@pytest.fixture(params=["sessions", "poll_reads"])
def reads(
    request: pytest.FixtureRequest, sessions: sessionmaker[Session], db_url: str
) -> Iterator[event_reads.StreamReads]:
    """A stream's reads: in a session of its own in a thread, or as the API reads them (on the
    event loop's connection on SQLite, in a session of its own on PostgreSQL)."""
    if request.param == "sessions":
        yield event_reads.SessionReads(sessions)
        return
    poll_reads = PollReads(db_url)
    try:
        if not poll_reads.on_event_loop:
            pytest.skip("here the API's streams read as SessionReads does (the other param)")
        yield poll_reads.for_streams(sessions)
    finally:
        poll_reads.close()


@pytest.fixture
def training(sessions: sessionmaker[Session]) -> FakeTraining:
    training = FakeTraining(sessions, PARAMS)
    training.submit()
    return training


def test_cursor_round_trips_and_rejects_what_it_did_not_send() -> None:
    for cursor in (Cursor(2, 17, 1, 9), Cursor(2, 17, 1, 10, final=True)):
        assert Cursor.parse(cursor.encode()) == cursor
    assert Cursor(2, 17, 1, 10, final=True).encode() == "2:17:1:10:end"
    assert Cursor.parse(None) == Cursor.parse("") == Cursor()
    assert Cursor.parse("2:17:1") == Cursor(2, 17, 1)  # an id sent before the count was
    bad_ids = ("x", "1:2", "1:2:3:4:5", "1:2:3:end", "1:2:3:4:END", "1:2:3:4:end:5", "1:-2:0")
    for bad in (*bad_ids, "a:b:c", "+1:2:3", "1_0:2:3", f"1:{2**31}:0", "1:0:999999999999"):
        with pytest.raises(InvalidInput, match="Last-Event-ID"):
            Cursor.parse(bad)
    assert Cursor.parse(f"1:{2**31 - 1}:0") == Cursor(1, 2**31 - 1, 0)  # the columns' largest
    with pytest.raises(InvalidInput, match="last_event_id") as raised:
        Cursor.parse(f"{2**31}:0:0", loc=("query", "last_event_id"))
    assert raised.value.details == [{"loc": ["query", "last_event_id"], "msg": "invalid event id"}]


def test_a_queued_job_gets_its_status_then_nothing_until_it_changes(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    state = StreamState(cursor=Cursor(), job_id=training.job_id)
    evs, done = poll(sessions, state)
    assert kinds(evs) == ["status"] and not done
    first = evs[0].json()
    assert (first["status"], first["final"], first["steps_per_epoch"]) == ("queued", False, 5)
    assert first["params"]["epochs"] == 2
    assert poll(sessions, state) == ([], False)

    training.claim()
    evs, done = poll(sessions, state)
    # The attempt changed (0 → 1): announced first, and the position starts over.
    assert kinds(evs) == ["status"] and evs[0].json()["attempt"] == 1
    assert evs[0].id == "1:0:0:2"


def test_steps_are_batched_and_each_epoch_follows_its_last_step(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    training.claim()
    state = StreamState(cursor=Cursor(), job_id=training.job_id)
    poll(sessions, state)
    training.advance(3)
    evs, _ = poll(sessions, state)
    assert kinds(evs) == ["step"] and steps_of(evs) == [1, 2, 3]
    assert evs[0].id == "1:3:0:2"

    # The rest of epoch 1 and part of epoch 2 arrive in one poll: split at the epoch's end.
    training.advance(2, end_epoch=0.5)
    training.advance(2)
    evs, _ = poll(sessions, state)
    assert kinds(evs) == ["step", "epoch", "step"]
    assert steps_of(evs[:1]) == [4, 5] and steps_of(evs[2:]) == [6, 7]
    assert evs[1].json() == {"epoch": 1, "accuracy": 0.5, "examples_seen": 50}
    assert [e.id for e in evs] == ["1:5:0:3", "1:5:1:4", "1:7:1:5"]

    training.advance(3, end_epoch=0.75)
    training.finish()
    evs, done = poll(sessions, state)
    assert kinds(evs) == ["step", "epoch", "status"] and done
    final = evs[-1].json()
    assert (final["status"], final["final"], final["accuracy"]) == ("succeeded", True, 0.75)
    # The final status is at the last epoch's position, yet its id is its own, marked final.
    assert [e.id for e in evs] == ["1:10:1:6", "1:10:2:7", "1:10:2:8:end"]


def test_resuming_from_an_id_sends_only_what_came_after(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    training.claim()
    training.run_epoch(0.5)
    training.run_epoch(0.8)
    training.finish()
    everything, done = poll(sessions, StreamState(cursor=Cursor(), job_id=training.job_id))
    assert done and steps_of(everything) == list(range(1, 11))
    assert kinds(everything) == ["status", "step", "epoch", "step", "epoch", "status"]

    # Resume from the id of the first epoch event: epoch 2's steps, its accuracy, the end.
    resumed, done = poll(
        sessions, StreamState(cursor=Cursor.parse(everything[2].id), job_id=training.job_id)
    )
    assert done and kinds(resumed) == ["status", "step", "epoch", "status"]
    assert steps_of(resumed) == [6, 7, 8, 9, 10] and resumed[2].json()["epoch"] == 2
    # No id repeats, the resumed one included (the opening status is at its position).
    ids = [e.id for e in everything[:3] + resumed]
    assert len(set(ids)) == len(ids)
    reads = event_reads.SessionReads(sessions)

    def ended(event_id: str | None) -> bool:
        job = anyio.run(events.opening_row, reads, training.job_id)
        return events.has_ended(job, Cursor.parse(event_id))

    assert not ended(everything[-2].id)
    assert ended(everything[-1].id) and ended(resumed[-1].id)

    # An id from an attempt that is gone: everything again, for the current attempt.
    stale, _ = poll(sessions, StreamState(cursor=Cursor(7, 99, 9), job_id=training.job_id))
    assert steps_of(stale) == list(range(1, 11))


def test_every_id_a_stream_sends_is_one_it_takes_back(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    """The count of events sent goes on from a client's id; past nine digits it starts again
    from 0 (it went on to ten digits, an id the route then refused with 422)."""
    training.claim()
    training.run_epoch(0.5)
    training.finish()
    last = Cursor(attempt=1, sent=events.SENT_WRAP - 2)
    sent, done = poll(sessions, StreamState(cursor=last, job_id=training.job_id))
    ids = [str(e.id) for e in sent]
    assert done and [i.split(":")[3] for i in ids][:3] == ["999999999", "0", "1"]
    for event_id in ids:
        assert re.fullmatch(events.EVENT_ID_PATTERN, event_id), event_id
        Cursor.parse(event_id)  # taken back, no 422


def test_a_retried_job_starts_the_stream_over(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    training.claim()
    training.advance(4)
    state = StreamState(cursor=Cursor(), job_id=training.job_id)
    evs, _ = poll(sessions, state)
    assert steps_of(evs) == [1, 2, 3, 4]

    lapse_leases(sessions)
    training.worker_id = "second-worker"
    training.claim()
    training.advance(2)
    evs, _ = poll(sessions, state)
    assert kinds(evs) == ["status", "step"]
    assert evs[0].json()["attempt"] == 2 and steps_of(evs) == [1, 2]
    assert evs[-1].id == "2:2:0:4"


def test_a_stream_resumed_from_a_released_run_gets_the_next_runs_steps_again(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    """A worker that shuts down gives its job back; the next run rewinds to the last finished
    epoch (here the start) and trains those steps again. A client that reconnects with the
    released run's last id must get them: the run's number was once reused, and the stream
    took the id for a position in the new run."""
    training.claim()
    training.advance(4)
    first, _ = poll(sessions, StreamState(cursor=Cursor(), job_id=training.job_id))
    assert steps_of(first) == [1, 2, 3, 4]
    training.release()
    training.worker_id = "second-worker"
    training.claim()
    training.advance(3)
    resumed, _ = poll(
        sessions, StreamState(cursor=Cursor.parse(first[-1].id), job_id=training.job_id)
    )
    assert kinds(resumed) == ["status", "step"]
    assert resumed[0].json()["attempt"] == 2 and steps_of(resumed) == [1, 2, 3]


def test_the_step_limit_holds_back_epochs_and_the_end(
    sessions: sessionmaker[Session], training: FakeTraining, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "STEPS_PER_POLL", 3)
    training.claim()
    training.run_epoch(0.5)
    training.finish(JobStatus.FAILED, error="boom")
    state = StreamState(cursor=Cursor(), job_id=training.job_id)
    first, done = poll(sessions, state)
    assert kinds(first) == ["status", "step"] and not done  # 3 of 5 steps: no epoch, no end yet
    second, done = poll(sessions, state)
    assert kinds(second) == ["step", "epoch", "status"] and done
    assert steps_of(second) == [4, 5]
    assert second[-1].json()["error"] == "boom"


class LoopReads(event_reads.SessionReads):
    """Reads that may hold the event loop for a few steps at a time."""

    loop_steps = 3


def test_reads_that_hold_the_loop_read_a_few_steps_at_a_time_and_miss_none(
    sessions: sessionmaker[Session], training: FakeTraining
) -> None:
    training.claim()
    training.run_epoch(0.5)
    training.run_epoch(0.7)
    training.finish()
    sent = [read(e) for e in collect_all(LoopReads(sessions), training.job_id)]
    batches = [[s["step"] for s in e.json()["steps"]] for e in sent if e.event == "step"]
    assert max(len(b) for b in batches) == LoopReads.loop_steps
    assert [n for b in batches for n in b] == list(range(1, 11))
    assert [e.json()["epoch"] for e in sent if e.event == "epoch"] == [1, 2]
    assert sent[-1].json()["final"] is True


def test_the_stream_ends_with_the_job(
    sessions: sessionmaker[Session], training: FakeTraining, reads: event_reads.StreamReads
) -> None:
    async def collect() -> list[ServerSentEvent]:
        sent = []
        async for event in stream(reads, training.job_id, Cursor(), poll_s=0.01):
            sent.append(event)
            if len(sent) == 1:  # the queued status: the job is cancelled
                with sessions.begin() as session:
                    job: Any = session.get(Job, training.job_id)
                    job.status = JobStatus.CANCELLED
        return sent

    sent = anyio.run(collect)
    # The reconnection delay is the wire's (the route writes it on the first event): the
    # events a job's streams share carry none of a stream's own.
    assert [e.retry for e in sent] == [None, None]
    received = [read(e) for e in sent]
    assert [(e.event, e.json()["status"]) for e in received] == [
        ("status", "queued"),
        ("status", "cancelled"),
    ]
    assert received[-1].json()["final"] is True


def test_payloads_are_one_line_and_never_nan() -> None:
    assert (
        events.json_data({"text": "two\nlines", "x": [1, 2]}) == '{"text":"two\\nlines","x":[1,2]}'
    )
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            events.json_data({"steps": [{"step": 1, "loss": bad}]})
    assert events.json_data({"error": None}) == '{"error":null}'


def test_payloads_read_back_as_the_standard_librarys_encoding_does() -> None:
    """The payload's encoder (orjson) against the standard library's, value for value: every
    float reads back bit for bit, whatever its size, as do the rows' other types."""
    rng = random.Random(15)
    floats = [0.0, -0.0, 1e-05, 1e16, 5e-324, 1.7976931348623157e308, 0.1, 2.0, 1 / 3]
    floats += [rng.uniform(0, 5) for _ in range(500)]
    floats += [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(2000)]
    for i, f in enumerate(f for f in floats if math.isfinite(f)):
        assert_reads_back_alike({"steps": [{"step": i, "epoch": 1, "loss": f, "examples_seen": i}]})
    assert_reads_back_alike({"status": "failed", "error": None, "text": "two\nlines é ✓"})


def test_a_jobs_own_payloads_read_back_as_the_standard_librarys_encoding_does(
    sessions: sessionmaker[Session], training: FakeTraining, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every payload a stream of a whole job builds (its statuses, steps, epochs) as well."""
    payloads: list[Any] = []
    encode = events.json_data

    def recorded(data: Any) -> str:
        payloads.append(data)
        return encode(data)

    monkeypatch.setattr(events, "json_data", recorded)
    state = StreamState(cursor=Cursor(), job_id=training.job_id)
    poll(sessions, state)
    training.claim()
    for accuracy in (0.5, 0.8):
        training.run_epoch(accuracy)
        poll(sessions, state)
    training.finish(JobStatus.FAILED, "diverged\u2028at step 7: loss 1e+400")
    assert poll(sessions, state)[1]
    monkeypatch.undo()  # what follows encodes the payloads again, unrecorded
    kinds = {
        "status" if "status" in p else "steps" if "steps" in p else frozenset(p) for p in payloads
    }
    assert kinds == {"status", "steps", frozenset({"epoch", "accuracy", "examples_seen"})}
    for payload in payloads:
        assert_reads_back_alike(payload)


def test_a_payload_is_one_line_wherever_a_reader_breaks_lines() -> None:
    """No character that any reader takes for a line's end reaches the wire raw: CR and LF,
    and those Python's ``str.splitlines`` also breaks at (httpx's ``iter_lines``, which the
    CLI reads a stream with), all escaped as the standard library escaped them."""
    breaks = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    for text in (breaks, f"error{breaks}id: 1:2:3:4:end", "é\u2028✓"):
        encoded = events.json_data({"error": text})
        assert encoded.splitlines() == [encoded]
        assert json.loads(encoded) == {"error": text}
        block = format_sse_event(data_str=encoded, event="status", id="1:0:0:1")
        assert [e.json() for e in sse.parse(block.decode().splitlines())] == [{"error": text}]


def assert_reads_back_alike(payload: Any) -> None:
    """``payload`` encoded for a stream reads back as the standard library's encoding of it,
    each float to the bit."""
    encoded = events.json_data(payload)
    reference = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    assert json.loads(encoded) == json.loads(reference)
    for ours, theirs in zip(floats_in(encoded), floats_in(reference), strict=True):
        assert struct.pack("<d", ours) == struct.pack("<d", theirs)


def floats_in(encoded: str) -> list[float]:
    """Every float of a payload, in order, as JSON reads it back."""
    found: list[float] = []

    def parse(text: str) -> float:
        found.append(float(text))
        return found[-1]

    json.loads(encoded, parse_float=parse)
    return found


def outage_error(tmp_path: Path) -> Exception:
    """A genuine outage as SQLAlchemy raises it: SQLite cannot open its file (a folder)."""
    engine = create_engine(f"sqlite:///{tmp_path}")
    try:
        with pytest.raises(OperationalError) as raised, engine.connect():
            pass
    finally:
        engine.dispose()
    return raised.value


def collect_all(reads: event_reads.StreamReads, job_id: str) -> list[ServerSentEvent]:
    async def collect() -> list[ServerSentEvent]:
        return [e async for e in stream(reads, job_id, Cursor(), poll_s=0.01)]

    return anyio.run(collect)


def test_a_stream_waits_out_an_outage_and_carries_on_where_it_was(
    reads: event_reads.StreamReads,
    training: FakeTraining,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    training.claim()
    training.run_epoch(0.5)
    training.run_epoch(0.7)
    training.finish()
    undisturbed = collect_all(reads, training.job_id)
    # The database goes away in the middle of polls, after the job was read and its status
    # event prepared: nothing of that poll may be lost or sent twice.
    read_steps = metric_repo.read_steps
    failures = iter(range(4))

    def failing(*args: Any, **kwargs: Any) -> Any:
        if next(failures, None) is not None:
            raise outage_error(tmp_path)
        return read_steps(*args, **kwargs)

    monkeypatch.setattr(metric_repo, "read_steps", failing)
    assert collect_all(reads, training.job_id) == undisturbed
    assert next(failures, None) is None  # every failure was met


def test_a_bug_still_ends_the_stream_with_its_error(
    reads: event_reads.StreamReads, training: FakeTraining, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ProgrammingError("SELEC", {}, Exception("syntax error"))

    monkeypatch.setattr(metric_repo, "read_steps", broken)
    with pytest.raises(ProgrammingError):
        collect_all(reads, training.job_id)


def test_each_write_of_the_job_wakes_its_stream_at_once(
    sessions: sessionmaker[Session],
    training: FakeTraining,
    db_url: str,
    reads: event_reads.StreamReads,
) -> None:
    # The stream reads every 60 s without a wake-up; the whole job must reach it within 20.
    wakeups.attach(sessions, db_url, enabled=True)
    writes: list[Callable[[], object]] = [
        training.claim,
        lambda: training.advance(2),
        lambda: training.advance(3, end_epoch=0.5),
        lambda: training.run_epoch(0.7),
        training.finish,
    ]

    async def follow(listener: wakeups.Listener) -> list[sse.Event]:
        received: list[sse.Event] = []
        with anyio.fail_after(20):
            followed = stream(reads, training.job_id, Cursor(), poll_s=60, wake=listener)
            async for event in followed:
                received.append(read(event))
                if writes:  # the next write, once the stream has shown the last one
                    await anyio.to_thread.run_sync(writes.pop(0))
        return received

    with wakeups.listen(db_url, [wakeups.JOB_PROGRESS], enabled=True) as listener:
        assert listener.connected.wait(10)
        received = anyio.run(follow, listener)
    assert writes == []
    assert steps_of(received) == list(range(1, 11))
    assert [e.json()["status"] for e in received if e.event == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
