"""GET /jobs/{id}/events over HTTP: the stream, resume by header or query, 204, 404 and 422;
each both ways, started by the streams' fast lane and by the route."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, MutableMapping
from contextlib import ExitStack
from typing import Any

import anyio
import httpx
import httpx_sse
import pytest
from fastapi.sse import ServerSentEvent
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service import sse
from service.api.routes.events import (
    RETRY_MS,
    Chunks,
    EventStreamResponse,
    LastChunk,
    encode,
    wire,
)
from service.domain import event_reads, events, stream_slots
from service.schemas import JobCreate
from service.settings import Settings
from tests.records import FakeTraining
from tests.service.api.routes.conftest import BOTH_WAYS
from tests.support import wait_for

UNKNOWN = "0" * 32


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"events_poll_s": 0.05})


def read_stream(client: TestClient, path: str, **kwargs: object) -> list[sse.Event]:
    with client.stream("GET", path, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        return list(sse.parse(response.iter_lines()))


@BOTH_WAYS
def test_a_live_job_streams_until_it_ends(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    training = FakeTraining(sessions, JobCreate(epochs=2, batch_size=10, trainset_size=30))
    job_id = training.submit()
    training.claim()
    received: list[sse.Event] = []
    first_step = threading.Event()

    def follow() -> None:
        with client.stream("GET", f"/jobs/{job_id}/events") as response:
            for event in sse.parse(response.iter_lines()):
                received.append(event)
                if event.event == "step":
                    first_step.set()

    reader = threading.Thread(target=follow)
    reader.start()
    training.advance(2)
    assert first_step.wait(timeout=30), "no step event arrived"
    training.advance(1, end_epoch=0.4)
    training.run_epoch(0.9)
    training.finish()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream did not end with the job"
    steps = [s["step"] for e in received if e.event == "step" for s in e.json()["steps"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e.json()["epoch"] for e in received if e.event == "epoch"] == [1, 2]
    assert received[-1].event == "status" and received[-1].json()["status"] == "succeeded"


@BOTH_WAYS
def test_a_quiet_stream_is_kept_alive_by_comments_no_client_takes_for_events(
    client: TestClient, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "KEEPALIVE_S", 0.05)  # 15 s unless patched
    training = FakeTraining(sessions, JobCreate(epochs=1, batch_size=10, trainset_size=20))
    job_id = training.submit()
    chunks: list[bytes] = []

    def follow() -> None:
        with client.stream("GET", f"/jobs/{job_id}/events") as response:
            chunks.extend(response.iter_raw())

    reader = threading.Thread(target=follow)
    reader.start()
    try:
        # A queued job: its status, then nothing to say for a while.
        wait_for(lambda: b": ping\n" in chunks, timeout_s=30, what="a keep-alive")
    finally:
        training.claim()
        training.finish()
        reader.join(timeout=30)
    assert not reader.is_alive(), "the stream did not end with the job"
    lines = b"".join(chunks).decode().split("\n")
    assert lines[: lines.index("")] == [  # the first event says how to reconnect, with data
        "event: status",
        lines[1],
        lines[2],
        "retry: 1000",
    ]
    assert lines[1].startswith("data: {") and lines[2].startswith("id: ")
    # A keep-alive is the comment line alone: a blank line after it would make httpx-sse
    # (which dispatches on every blank line once an id was seen) hand over an empty event.
    assert ": ping" in lines and "" not in {
        lines[i + 1] for i, x in enumerate(lines) if x[:1] == ":"
    }
    received = list(sse.parse(lines))
    assert received[0].json()["status"] == "queued"
    assert received[-1].json()["status"] == "succeeded" and received[-1].json()["final"]
    as_read = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=b"".join(chunks)
    )
    dispatched = list(httpx_sse.EventSource(as_read).iter_sse())
    assert [json.loads(e.data) for e in dispatched] == [e.json() for e in received]


@BOTH_WAYS
def test_resume_by_header_or_query(client: TestClient, sessions: sessionmaker[Session]) -> None:
    training = FakeTraining(sessions, JobCreate(epochs=2, batch_size=10, trainset_size=20))
    job_id = training.submit()
    training.claim()
    training.run_epoch(0.5)
    training.run_epoch(0.7)
    training.finish()
    everything = read_stream(client, f"/jobs/{job_id}/events")
    epoch_one = next(e for e in everything if e.event == "epoch")
    by_header = read_stream(
        client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": epoch_one.id}
    )
    by_query = read_stream(client, f"/jobs/{job_id}/events?last_event_id={epoch_one.id}")
    for resumed in (by_header, by_query):
        steps = [s["step"] for e in resumed if e.event == "step" for s in e.json()["steps"]]
        assert steps == [3, 4]
        assert [e.json()["epoch"] for e in resumed if e.event == "epoch"] == [2]
        ids = [e.id for e in everything[: everything.index(epoch_one) + 1] + resumed]
        assert len(set(ids)) == len(ids), ids


@BOTH_WAYS
def test_a_reconnection_after_the_final_event_gets_204(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    training = FakeTraining(sessions, JobCreate(epochs=1, batch_size=10, trainset_size=20))
    job_id = training.submit()
    training.claim()
    training.run_epoch(0.5)
    training.finish()
    everything = read_stream(client, f"/jobs/{job_id}/events")
    final, last_epoch = everything[-1], everything[-2]
    assert final.json()["final"] and final.id is not None and final.id.endswith(":end")
    for asked in (
        {"headers": {"Last-Event-ID": final.id}},
        {"params": {"last_event_id": final.id}},
    ):
        response = client.get(f"/jobs/{job_id}/events", **asked)  # type: ignore[arg-type]
        assert (response.status_code, response.content) == (204, b"")
    # One event short of the end: the final status again (under a new id), then the end.
    resumed = read_stream(
        client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": last_epoch.id}
    )
    assert [e.json()["final"] for e in resumed] == [False, True]
    assert final.id not in {e.id for e in resumed} and str(resumed[-1].id).endswith(":end")


@BOTH_WAYS
def test_unknown_job_and_bad_ids_are_refused_before_streaming(client: TestClient) -> None:
    response = client.get(f"/jobs/{UNKNOWN}/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert client.get("/jobs/nope/events").status_code == 422
    job_id = client.post("/jobs", json={}).json()["id"]
    response = client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "garbage"})
    assert response.status_code == 422
    assert "last-event-id" in response.json()["error"]["message"].lower()


@pytest.mark.parametrize("number", [2**31, 10**17, 999999999999999999])
@BOTH_WAYS
def test_an_id_beyond_the_columns_is_refused_before_streaming(
    client: TestClient, sessions: sessionmaker[Session], number: int
) -> None:
    # Such a step would fail the stream's query on PostgreSQL once the stream was open, and a
    # browser would reconnect with the same id every second.
    training = FakeTraining(sessions, JobCreate(epochs=1, batch_size=10, trainset_size=20))
    job_id = training.submit()
    for bad in (f"1:{number}:0", f"{number}:0:0", f"1:0:{number}"):
        response = client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
        assert response.status_code == 422, bad
        error = response.json()["error"]
        assert error["message"].startswith("header.last-event-id")
        assert error["details"][0]["loc"] == ["header", "last-event-id"]
        response = client.get(f"/jobs/{job_id}/events", params={"last_event_id": bad})
        assert response.status_code == 422, bad
        assert response.json()["error"]["details"][0]["loc"] == ["query", "last_event_id"]
    training.claim()
    training.finish()
    largest = "1:999999999:999999999"  # the largest the pattern admits: a stream that ends
    received = read_stream(client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": largest})
    assert received[-1].json()["final"] is True


@BOTH_WAYS
def test_streams_beyond_the_cap_get_503_and_an_ended_one_gives_its_place_back(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    cap = api_settings.max_event_streams
    training = FakeTraining(sessions, JobCreate(epochs=1, batch_size=10, trainset_size=10))
    job_id = training.submit()
    training.claim()
    training.run_epoch(0.5)
    training.finish()
    assert stream_slots.OPEN_STREAMS.count == 0
    for _ in range(2):  # each stream that ended, refused or not, gave its place back
        assert read_stream(client, f"/jobs/{job_id}/events")[-1].json()["final"]
        assert client.get(f"/jobs/{UNKNOWN}/events").status_code == 404
        assert stream_slots.OPEN_STREAMS.count == 0
    with ExitStack() as held:
        for _ in range(cap):  # the places other streams hold
            held.enter_context(stream_slots.OPEN_STREAMS.slot(cap))
        response = client.get(f"/jobs/{job_id}/events")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "at_capacity"
    assert read_stream(client, f"/jobs/{job_id}/events")[-1].json()["final"]


def test_each_polls_events_are_written_at_once() -> None:
    # One write, one chunk, one wake-up of the client per poll, not one per event.
    first = [
        ServerSentEvent(event="status", raw_data='{"a":1}', id="1:0:0:1", retry=1000),
        ServerSentEvent(event="step", raw_data='{"steps":[]}', id="1:2:0:2"),
    ]

    async def polls() -> AsyncIterator[list[ServerSentEvent]]:
        yield first
        yield [events.KEEPALIVE]

    async def written() -> list[bytes]:
        return [chunk async for chunk in wire(polls())]

    chunks = anyio.run(written)
    assert len(chunks) == 2
    assert chunks[0] == b"".join(encode(event) for event in first)
    parsed = list(sse.parse(chunks[0].decode().splitlines()))
    assert [(e.event, e.id) for e in parsed] == [("status", "1:0:0:1"), ("step", "1:2:0:2")]
    assert chunks[1].startswith(b":") and not list(sse.parse(chunks[1].decode().splitlines()))


def sent_messages(batches: list[list[ServerSentEvent]]) -> list[dict[str, Any]]:
    """What the events route's response sends for these polls' batches."""

    async def polls() -> AsyncIterator[list[ServerSentEvent]]:
        for batch in batches:
            yield batch

    async def run() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        response = EventStreamResponse(wire(polls()), media_type="text/event-stream")
        await response.stream_response(send)
        return sent

    return anyio.run(run)


def test_the_final_event_and_the_bodys_end_go_out_in_one_write() -> None:
    status = ServerSentEvent(event="status", raw_data='{"final":false}', id="1:0:0:1")
    final = ServerSentEvent(event="status", raw_data='{"final":true}', id="1:9:3:7:end")
    assert events.is_final(final) and not events.is_final(status)
    sent = sent_messages([[status], [events.KEEPALIVE], [status, final]])
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]
    assert sent[-1]["body"] == encode(status) + encode(final)  # no empty message after it
    # A stream that ends without its final event (its job was deleted) still ends its body.
    sent = sent_messages([[status]])
    first = encode(status.model_copy(update={"retry": RETRY_MS}))
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [(first, True), (b"", False)]


def test_a_batch_is_written_once_for_every_stream_that_sends_it() -> None:
    # A job's streams that stood alike are handed the same batch: its bytes are made once.
    chunks = Chunks()
    status = ServerSentEvent(event="status", raw_data='{"final":false}', id="1:0:0:1")
    step = ServerSentEvent(event="step", raw_data='{"steps":[]}', id="1:2:0:2")
    batch = [status, step]
    written = chunks.of(batch)
    assert written == encode(status) + encode(step) and not isinstance(written, LastChunk)
    assert chunks.of(batch) is written
    # The first batch of a stream carries the reconnection delay on its first event: a chunk
    # of its own, as shared as the other.
    opening = chunks.of(batch, retry=RETRY_MS)
    assert opening == encode(status.model_copy(update={"retry": RETRY_MS})) + encode(step)
    assert chunks.of(batch, retry=RETRY_MS) is opening and chunks.of(batch) is written
    # Kept by the batch's identity, never by its content: another list is written anew.
    alike = list(batch)
    assert chunks.of(alike) == written and chunks.of(alike) is not written
    final = ServerSentEvent(event="status", raw_data='{"final":true}', id="1:9:3:7:end")
    assert isinstance(chunks.of([step, final]), LastChunk)


def test_the_reconnection_delay_rides_on_the_first_event_not_on_a_keepalive() -> None:
    status = ServerSentEvent(event="status", raw_data='{"final":false}', id="1:0:0:1")

    async def polls() -> AsyncIterator[list[ServerSentEvent]]:
        yield [events.KEEPALIVE]  # the database was away at the first poll
        yield [status]
        yield [status]

    async def written() -> list[bytes]:
        return [chunk async for chunk in wire(polls())]

    chunks = anyio.run(written)
    assert chunks[0] == encode(events.KEEPALIVE)
    assert chunks[1] == encode(status.model_copy(update={"retry": RETRY_MS}))
    assert chunks[2] == encode(status)


def test_streams_read_on_the_loop_on_sqlite_and_in_sessions_of_their_own_elsewhere(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    # On PostgreSQL the lane's few threads are the polls': a hundred streams woken at once
    # would queue every poll behind them.
    app: Any = client.app
    reads = app.state.poll_reads.for_streams(sessions)
    if app.state.poll_reads.on_event_loop:
        assert reads is app.state.poll_reads and reads.loop_steps is not None
    else:
        assert isinstance(reads, event_reads.SessionReads) and reads.loop_steps is None
