"""The streams' fast lane starts exactly the streams the route starts, and leaves it the rest.

Two apps on one database, with the lanes and without (``MNIST_FAST_LANES=false``), asked the
same requests for the event streams of jobs that have ended (a stream of a job that has ended
is the same bytes each time it is read): the same status, headers and body, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import ServiceApp, create_app
from service.api.lanes import streams
from service.api.lanes.streams import StreamLane
from service.api.routes import events as events_route
from service.domain import events, stream_slots
from service.errors import DatabaseUnavailable
from service.settings import Settings
from service.status import JobStatus
from tests.records import PARAMS, FakeTraining

UNKNOWN = "0" * 32
# Headers that differ between any two answers.
OWN_HEADERS = {"date", "x-request-id"}


@pytest.fixture
def apps(settings: Settings) -> Iterator[dict[bool, TestClient]]:
    """An app with the fast lanes and one without, on one database."""
    with ExitStack() as stack:
        yield {
            lanes: stack.enter_context(
                TestClient(create_app(settings.model_copy(update={"fast_lanes": lanes})))
            )
            for lanes in (True, False)
        }


def lane_of(client: TestClient) -> StreamLane:
    """The app's streams' lane, found among the edge's layers."""
    layer: Any = client.app.edge  # type: ignore[attr-defined]
    while not isinstance(layer, StreamLane):
        layer = layer.app
    return layer


def ended_job(sessions: sessionmaker[Session], status: JobStatus) -> str:
    """A job that trained two epochs, then ended with ``status``."""
    training = FakeTraining(sessions, PARAMS)
    job_id = training.submit()
    training.claim()
    training.run_epoch(0.9)
    training.run_epoch(0.95)
    training.finish(status)
    return job_id


def answer(client: TestClient, path: str, headers: Any) -> tuple[Any, ...]:
    """Status, every header but those of the answer's own, and the body's bytes."""
    response = client.get(path, headers=headers, follow_redirects=False)
    kept = sorted((k, v) for k, v in response.headers.multi_items() if k not in OWN_HEADERS)
    return response.status_code, kept, response.content


def test_the_lane_starts_what_the_route_starts_and_leaves_it_the_rest(
    apps: dict[bool, TestClient], sessions: sessionmaker[Session]
) -> None:
    done = ended_job(sessions, JobStatus.SUCCEEDED)
    failed = ended_job(sessions, JobStatus.FAILED)
    ids = [
        line.removeprefix("id: ")
        for line in apps[False].get(f"/jobs/{done}/events").text.splitlines()
        if line.startswith("id: ")
    ]
    middle, final = ids[len(ids) // 2], ids[-1]
    assert final.endswith(":end") and len(ids) > 4
    old_style = ":".join(middle.split(":")[:3])  # attempt:step:epoch, sent before the count
    base = f"/jobs/{done}/events"
    # (name, path, headers, who answers: the lane or the route)
    cases: list[tuple[str, str, Any, bool]] = [
        ("from the start", base, {}, True),
        ("a failed job", f"/jobs/{failed}/events", {}, True),
        ("resumed by header", base, {"Last-Event-ID": middle}, True),
        ("resumed by query", f"{base}?last_event_id={middle}", {}, True),
        ("header before query", f"{base}?last_event_id={ids[1]}", {"Last-Event-ID": middle}, True),
        ("an empty header", f"{base}?last_event_id={middle}", {"Last-Event-ID": ""}, True),
        ("an empty query", f"{base}?last_event_id=", {}, True),
        (
            "a query percent-encoded",
            f"{base}?last%5Fevent%5Fid={middle.replace(':', '%3A')}",
            {},
            True,
        ),
        (
            "two headers: 422 from the route",
            base,
            [("last-event-id", middle), ("last-event-id", middle)],
            False,
        ),
        (
            "two headers, the first refused",
            base,
            [("last-event-id", "x"), ("last-event-id", middle)],
            False,
        ),
        ("a plus in the query", f"{base}?last_event_id=1:2:3+", {}, False),
        ("an id of before the count", base, {"Last-Event-ID": old_style}, True),
        ("ended, by header: 204", base, {"Last-Event-ID": final}, True),
        ("ended, by query: 204", f"{base}?last_event_id={final}", {}, True),
        ("a bad header", base, {"Last-Event-ID": "x"}, False),
        ("a header of ten digits", base, {"Last-Event-ID": "1:2:3:1234567890"}, False),
        ("a padded header", base, {"Last-Event-ID": f" {middle}"}, False),
        ("a bad query", f"{base}?last_event_id=1:2", {}, False),
        ("a good header, a bad query", f"{base}?last_event_id=x", {"Last-Event-ID": middle}, False),
        ("an unknown parameter", f"{base}?after=3", {}, False),
        (
            "a repeated parameter",
            f"{base}?last_event_id={middle}&last_event_id={middle}",
            {},
            False,
        ),
        ("an unknown job: 404", f"/jobs/{UNKNOWN}/events", {}, True),
        ("not an id", "/jobs/nope/events", {}, False),
        ("an upper-case id", f"/jobs/{done.upper()}/events", {}, False),
        ("a trailing slash", f"{base}/", {}, False),
    ]
    lane = lane_of(apps[True])
    differences, statuses = [], set()
    for name, path, headers, by_lane in cases:
        before = lane.answered
        with_lane, by_route = answer(apps[True], path, headers), answer(apps[False], path, headers)
        if with_lane != by_route:
            differences.append(f"{name}: lane {with_lane!r:.300} route {by_route!r:.300}")
        assert (lane.answered > before) is by_lane, name
        statuses.add(by_route[0])
    assert differences == [], "\n".join(differences)
    assert {200, 204, 404, 422} <= statuses, statuses
    twice = answer(apps[True], base, [("last-event-id", middle), ("last-event-id", "x")])
    assert twice[0] == 422 and b"given more than once" in twice[2]
    # A HEAD is the GET's, without its body; other methods are the route's, never the lane's.
    heads = [apps[lanes].head(base) for lanes in (True, False)]
    assert [h.status_code for h in heads] == [200, 200] and heads[0].content == b""
    for method in ("POST", "DELETE"):
        before = lane.answered
        answers = [apps[lanes].request(method, base) for lanes in (True, False)]
        assert answers[0].status_code == answers[1].status_code == 405, method
        assert answers[0].headers["allow"] == answers[1].headers["allow"], method
        assert lane.answered == before


def test_no_place_left_is_503_from_either(
    apps: dict[bool, TestClient], sessions: sessionmaker[Session], settings: Settings
) -> None:
    job_id = ended_job(sessions, JobStatus.SUCCEEDED)
    lane = lane_of(apps[True])
    with ExitStack() as held:
        for _ in range(settings.max_event_streams):
            held.enter_context(stream_slots.OPEN_STREAMS.slot(settings.max_event_streams))
        answers = [answer(apps[lanes], f"/jobs/{job_id}/events", {}) for lanes in (True, False)]
    assert answers[0] == answers[1] and answers[0][0] == 503, answers
    assert lane.answered == 1
    assert stream_slots.OPEN_STREAMS.count == 0


@pytest.mark.parametrize(
    ("error", "the_lanes"),
    [
        (DatabaseUnavailable("the database went away for a moment"), True),
        (OperationalError("SELECT", {}, Exception("no such column")), False),
    ],
    ids=["an outage: 503 from either", "no outage: the route's"],
)
def test_an_error_at_the_opening_read_gives_the_place_back(
    apps: dict[bool, TestClient],
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    the_lanes: bool,
) -> None:
    path = f"/jobs/{ended_job(sessions, JobStatus.SUCCEEDED)}/events"
    lane = lane_of(apps[True])
    held: list[int] = []

    async def failing(*_args: Any) -> Any:
        held.append(stream_slots.OPEN_STREAMS.count)  # a place, held while it tries
        raise error

    monkeypatch.setattr(streams, "open_stream", failing)  # the lane's
    with_lane = answer(apps[True], path, {})
    assert held == [1] and stream_slots.OPEN_STREAMS.count == 0
    assert lane.answered == int(the_lanes)
    if the_lanes:  # the route, meeting the same outage, answers the same
        monkeypatch.setattr(events_route, "open_stream", failing)
        assert with_lane == answer(apps[False], path, {}) and with_lane[0] == 503, with_lane
    else:  # handed on untouched: the route (its open_stream as it is) streams the job
        assert with_lane[0] == 200 and with_lane[2].rstrip().endswith(b":end")


def test_the_lanes_streams_are_counted_under_the_routes_path(
    apps: dict[bool, TestClient], sessions: sessionmaker[Session]
) -> None:
    job_id = ended_job(sessions, JobStatus.SUCCEEDED)
    client = apps[True]
    assert client.get(f"/jobs/{job_id}/events").status_code == 200
    assert lane_of(client).answered == 1
    scraped = client.get("/metrics").text
    assert 'route="/jobs/{job_id}/events",status="200"' in scraped, scraped[:3000]


@pytest.mark.parametrize(
    ("query", "header", "expected"),
    [
        (b"", None, events.Cursor()),
        (b"last_event_id=1:2:3:4", None, events.Cursor(1, 2, 3, 4)),
        (b"", b"1:2:3:4:end", events.Cursor(1, 2, 3, 4, final=True)),
        (b"last_event_id=9:9:9", b"1:2:3", events.Cursor(1, 2, 3)),
        (b"last_event_id=1:2:3", b"", events.Cursor(1, 2, 3)),
        (b"last_event_id=", None, events.Cursor()),
        (b"last_event_id=1:2", None, None),
        (b"last_event_id=1:2:3&x=1", None, None),
        (b"", b"1:2:3:4:5", None),
        (b"", b"1:2:3:0123456789", None),
        (b"", b"\xff", None),
    ],
)
def test_a_streams_start_is_read_as_the_route_reads_it(
    query: bytes, header: bytes | None, expected: events.Cursor | None
) -> None:
    headers = [] if header is None else [(b"last-event-id", header)]
    scope = {"query_string": query, "headers": headers}
    assert anyio.run(streams.read_cursor, scope) == expected


def test_without_the_lanes_every_stream_is_the_routes(settings: Settings) -> None:
    for lanes in (True, False):
        app: Any = create_app(settings.model_copy(update={"fast_lanes": lanes}))
        layers, layer = [], app.edge
        while hasattr(layer, "app"):
            layers.append(layer)
            layer = layer.app
        assert any(isinstance(x, StreamLane) for x in layers) is lanes


@pytest.mark.parametrize("lanes", [True, False])
def test_the_app_says_which_requests_are_event_streams(settings: Settings, lanes: bool) -> None:
    """What the edge ends at a client's end of data (service/api/edge/protocol.py), as the router
    matches: the path inside the app, under a root path too, and only a GET of a valid id."""
    app = create_app(settings.model_copy(update={"fast_lanes": lanes}))
    assert isinstance(app, ServiceApp) and app.is_event_stream is not None
    job_id = "0123456789abcdef0123456789abcdef"

    def scope(method: str, path: str, root_path: str = "") -> dict[str, Any]:
        return {"type": "http", "method": method, "path": path, "root_path": root_path}

    assert app.is_event_stream(scope("GET", f"/jobs/{job_id}/events"))
    assert app.is_event_stream(scope("GET", f"/mnist/jobs/{job_id}/events", "/mnist"))
    assert not app.is_event_stream(scope("HEAD", f"/jobs/{job_id}/events"))
    assert not app.is_event_stream(scope("GET", f"/jobs/{job_id}"))
    assert not app.is_event_stream(scope("GET", f"/jobs/{job_id}/events/"))
    assert not app.is_event_stream(scope("GET", "/jobs/not-an-id/events"))
