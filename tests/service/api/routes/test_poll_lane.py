"""The polls' fast lane in the app (a job's metrics, and the job): the route's answer, without
the route.

Every test runs with the lanes on and off (``BOTH_WAYS``): the answers are the same, and only
who gives them differs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.api.lanes.polls import LOOP_STEPS
from service.api.routes import jobs as jobs_routes
from service.domain import jobs
from service.schemas import JobRead
from service.settings import Settings
from service.store import metric_repo
from tests.conftest import OwnPostgres, terminate_backends
from tests.service.api.routes.conftest import BOTH_WAYS
from tests.service.api.routes.test_jobs import _record_steps
from tests.support import app_settings

pytestmark = BOTH_WAYS

MISSING = "0123456789abcdef0123456789abcdef"


class CountingJobs:
    """``service.domain.jobs`` as the routes see it, counting the routes' metrics and job
    reads."""

    def __init__(self) -> None:
        self.reads = 0
        self.job_reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(jobs, name)

    def metrics_json(self, *args: Any, **kwargs: Any) -> bytes | None:
        self.reads += 1
        return jobs.metrics_json(*args, **kwargs)

    def to_read(self, *args: Any, **kwargs: Any) -> JobRead:
        self.job_reads += 1
        return jobs.to_read(*args, **kwargs)


@pytest.fixture
def route_jobs(monkeypatch: pytest.MonkeyPatch) -> CountingJobs:
    counting = CountingJobs()
    monkeypatch.setattr(jobs_routes, "jobs", counting)
    return counting


def test_the_lane_answers_polls_with_the_routes_bytes(
    client: TestClient,
    sessions: sessionmaker[Session],
    route_jobs: CountingJobs,
    fast_lanes: bool,
) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    _record_steps(sessions, job_id, 25)
    polls = ["", "?after_step=20", "?limit=3", "?after_step=5&limit=10", "?limit=7&after_step=0"]
    plain = [client.get(f"/jobs/{job_id}/metrics{q}") for q in polls]
    # The same polls written otherwise: the lane reads them with the route's model, as the
    # route does (leading zeros; a sign, a float or an underscore is refused by both).
    spelt = [
        "?after_step=00",
        "?after_step=020",
        "?limit=03",
        "?after_step=05&limit=010",
        "?limit=7&after_step=00",
    ]
    other = [client.get(f"/jobs/{job_id}/metrics{q}") for q in spelt]
    assert [r.status_code for r in plain + other] == [200] * (len(polls) + len(spelt))
    assert route_jobs.reads == (0 if fast_lanes else len(polls) + len(spelt))
    for one, same in zip(plain, other, strict=True):
        assert one.content == same.content
        assert one.headers["content-type"] == same.headers["content-type"] == "application/json"
    assert [s["step"] for s in plain[1].json()["steps"]] == [21, 22, 23, 24, 25]
    assert plain[3].json()["next_after_step"] == 15
    assert plain[0].headers["x-request-id"]  # the middlewares apply as to any route


def test_what_the_lane_does_not_take_the_route_answers(
    client: TestClient, sessions: sessionmaker[Session], route_jobs: CountingJobs
) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    assert client.get(f"/jobs/{MISSING}/metrics").status_code == 404  # the lane found none
    assert client.get(f"/jobs/{job_id}/metrics?limt=5").status_code == 422
    assert client.get(f"/jobs/{job_id}/metrics?limit=5&limit=6").status_code == 422
    too_many = jobs_routes.MAX_STEPS_PAGE + 1
    assert client.get(f"/jobs/{job_id}/metrics?limit={too_many}").status_code == 422
    assert client.get(f"/jobs/{job_id}/metrics?after_step=-1").status_code == 422
    assert client.get(f"/jobs/{job_id}/metrics?after_step={'9' * 19}").status_code == 422
    assert client.get("/jobs/NOT-AN-ID/metrics").status_code == 422
    assert route_jobs.reads == 0  # all refused before reading
    head = client.head(f"/jobs/{job_id}/metrics")
    assert head.status_code in (200, 405)  # whatever the route says: the lane takes only GET


def test_lane_polls_are_counted_under_the_metrics_route(client: TestClient) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    for _ in range(4):
        assert client.get(f"/jobs/{job_id}/metrics?after_step=0").status_code == 200
    exposition = client.get("/metrics").text
    line = 'mnist_http_requests_total{method="GET",route="/jobs/{job_id}/metrics",status="200"} 4.0'
    assert line in exposition


def test_job_polls_are_the_lanes_and_counted_under_the_job_route(
    client: TestClient,
    sessions: sessionmaker[Session],
    route_jobs: CountingJobs,
    fast_lanes: bool,
) -> None:
    job_id = client.post("/jobs", json={"epochs": 2, "seed": 7}).json()["id"]
    _record_steps(sessions, job_id, 5)
    polls = [client.get(f"/jobs/{job_id}") for _ in range(3)]
    assert route_jobs.job_reads == (0 if fast_lanes else 3)
    body = polls[0].json()
    assert body["id"] == job_id and body["params"]["epochs"] == 2 and body["params"]["seed"] == 7
    assert body["step"] == 5 and body["status"] == "running" and body["heartbeat_at"]
    assert polls[0].headers["content-type"] == "application/json"
    assert polls[0].headers["x-request-id"]
    # What the lane does not take (a query, an unknown job) the route answers, and refuses.
    assert client.get(f"/jobs/{job_id}?verbose=1").status_code == 422
    assert client.get(f"/jobs/{MISSING}").status_code == 404
    exposition = client.get("/metrics").text
    assert 'mnist_http_requests_total{method="GET",route="/jobs/{job_id}",status="200"} 3.0' in (
        exposition
    )


@pytest.fixture
def keyed_client(api_settings: Settings) -> Iterator[TestClient]:
    settings = Settings.model_validate({**api_settings.model_dump(), "api_key": "k" * 32})
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_lane_is_behind_the_api_key(keyed_client: TestClient) -> None:
    job_id = keyed_client.post(
        "/jobs", json={}, headers={"authorization": "Bearer " + "k" * 32}
    ).json()["id"]
    assert keyed_client.get(f"/jobs/{job_id}/metrics").status_code == 401
    answered = keyed_client.get(
        f"/jobs/{job_id}/metrics", headers={"authorization": "Bearer " + "k" * 32}
    )
    assert answered.status_code == 200 and answered.json()["status"] == "queued"
    assert keyed_client.get(f"/jobs/{job_id}").status_code == 401


def test_a_poll_is_answered_while_every_pooled_connection_is_taken(
    client: TestClient, sessions: sessionmaker[Session], fast_lanes: bool
) -> None:
    if not fast_lanes:
        pytest.skip("the route reads through the pool, as every route does")
    job_id = client.post("/jobs", json={}).json()["id"]
    steps = LOOP_STEPS + 10
    _record_steps(sessions, job_id, steps)
    engine = client.app.state.read_sessions.kw["bind"]  # type: ignore[attr-defined]
    pool = engine.pool
    # In a busy server the shared pool's connections go back as the loop finishes requests:
    # a poll that waited for one (30 s) on the loop, or in a thread taking a token the
    # holders' routes need, would stall the process. The lane reads through its own.
    free = pool.size() + pool._max_overflow - pool.checkedout()
    held = [engine.connect() for _ in range(free)]
    try:
        small = client.get(f"/jobs/{job_id}/metrics?after_step={steps - 2}")
        large = client.get(f"/jobs/{job_id}/metrics?limit=100000")
    finally:
        for connection in held:
            connection.close()
    assert small.status_code == 200
    assert [s["step"] for s in small.json()["steps"]] == [steps - 1, steps]
    assert large.status_code == 200
    assert [s["step"] for s in large.json()["steps"]] == list(range(1, steps + 1))


class ThreadLog:
    """Which thread read each page of steps (and how many it asked for), and encoded it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[int, int]] = []  # (limit, thread)
        self.encodes: list[tuple[int, int]] = []  # (steps, thread)
        read_steps, encode = metric_repo.read_steps, jobs.encode_metrics

        def logged_read(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            self.reads.append((kwargs["limit"], threading.get_ident()))
            return read_steps(*args, **kwargs)

        def logged_encode(page: dict[str, Any]) -> bytes:
            self.encodes.append((len(page["steps"]), threading.get_ident()))
            return encode(page)

        monkeypatch.setattr(metric_repo, "read_steps", logged_read)
        monkeypatch.setattr(jobs, "encode_metrics", logged_encode)


def test_large_pages_are_read_and_encoded_off_the_event_loop(
    client: TestClient,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    fast_lanes: bool,
) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    steps = LOOP_STEPS + 1
    _record_steps(sessions, job_id, steps)
    loop_thread = client.portal.call(threading.get_ident)  # type: ignore[union-attr]
    log = ThreadLog(monkeypatch)

    whole = client.get(f"/jobs/{job_id}/metrics?limit=100000")  # the lane, or the route
    assert whole.status_code == 200
    assert len(whole.json()["steps"]) == steps
    large_reads = [thread for limit, thread in log.reads if limit > LOOP_STEPS]
    assert len(large_reads) == 1
    assert loop_thread not in large_reads
    assert [steps] == [n for n, _ in log.encodes if n > LOOP_STEPS]
    assert loop_thread not in [thread for n, thread in log.encodes if n > LOOP_STEPS]

    # A live chart's poll brings a few steps: on SQLite the loop reads it, as a hand-off to
    # a thread would cost more than the read.
    log.reads.clear()
    tail = client.get(f"/jobs/{job_id}/metrics?after_step={steps - 3}")
    assert [s["step"] for s in tail.json()["steps"]] == [steps - 2, steps - 1, steps]
    on_loop = [thread == loop_thread for _, thread in log.reads]
    assert on_loop == [fast_lanes and db_url.startswith("sqlite")]


def test_polls_are_answered_when_the_server_cuts_the_lanes_connections(
    own_postgres: OwnPostgres, tmp_path: Path, route_jobs: CountingJobs, fast_lanes: bool
) -> None:
    # The lane's connections are not pinged as they are checked out (a round trip a poll): one
    # the server dropped fails its poll, which the route answers, and is discarded.
    url, admin, name = own_postgres
    with TestClient(create_app(app_settings(url, tmp_path, fast_lanes=fast_lanes))) as client:
        job_id = client.post("/jobs", json={}).json()["id"]
        paths = [f"/jobs/{job_id}", f"/jobs/{job_id}/metrics"]
        first = [client.get(path).json() for path in paths]
        reads = route_jobs.job_reads + route_jobs.reads
        terminate_backends(admin, name)
        again = [client.get(path) for path in paths]  # on the cut connections
        assert [r.status_code for r in again] == [200, 200]
        assert [r.json() for r in again] == first
        cut = route_jobs.job_reads + route_jobs.reads
        after = [client.get(path).json() for path in paths]
        assert after == first
        if fast_lanes:
            assert (reads, cut) == (0, 2)  # the route answered the two polls the cut failed
            assert route_jobs.job_reads + route_jobs.reads == cut  # and the lane the next
            # A job's poll is one statement, outside any transaction: no BEGIN, no COMMIT.
            statements = client.app.state.poll_reads.statements  # type: ignore[attr-defined]
            with statements.connect() as connection:
                assert connection.connection.dbapi_connection.autocommit
