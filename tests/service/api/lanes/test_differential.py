"""The fast lanes answer exactly what the routes answer: the same requests to an app with the
lanes and to one without (``MNIST_FAST_LANES=false``), the same statuses and bodies.

Both apps share one database and one model that a real worker trained; the corpus
(:mod:`tests.service.api.lanes.corpus`) holds odd forms, raw images of every size, query
variants, metrics polls and API keys. Every difference is listed, not only the first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.api.routes import jobs as jobs_routes
from service.api.routes import predict as predict_route
from service.domain import jobs
from service.schemas import JobRead
from tests.records import PARAMS, FakeTraining
from tests.service.api.lanes.corpus import FULL_KEY, LIMITS, READ_KEY, Case, corpus
from tests.service.api.routes.conftest import train_job
from tests.support import app_settings

Apps = dict[tuple[bool, bool], TestClient]  # (keyed, fast_lanes) → client
# The corpus's size, and how many of its requests the lanes must answer themselves: the
# comparison means something only if both kinds of answer are in it.
MIN_CASES = 80
MIN_LANE_ANSWERS = 20


class RouteHits:
    """Counts the requests that reach the predict, metrics and job routes' own reading; stands
    in for :mod:`service.domain.jobs` as the jobs routes see it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        read_input = predict_route._read_input

        async def counted_read(*args: Any) -> Any:
            self.count += 1
            return await read_input(*args)

        monkeypatch.setattr(predict_route, "_read_input", counted_read)
        monkeypatch.setattr(jobs_routes, "jobs", self)

    def __getattr__(self, name: str) -> Any:
        return getattr(jobs, name)

    def metrics_json(self, *args: Any, **kwargs: Any) -> bytes | None:
        self.count += 1
        return jobs.metrics_json(*args, **kwargs)

    def to_read(self, *args: Any, **kwargs: Any) -> JobRead:
        self.count += 1
        return jobs.to_read(*args, **kwargs)


@pytest.fixture
def apps(db_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[Apps]:
    """Four apps on one database: open and keyed, each with and without the fast lanes."""
    base = app_settings(db_url, tmp_path, data_dir=small_mnist, **LIMITS)
    keys = {"api_key": FULL_KEY, "readonly_api_key": READ_KEY}
    keyed = app_settings(db_url, tmp_path, data_dir=small_mnist, **LIMITS, **keys)
    with ExitStack() as stack:
        clients: Apps = {}
        for is_keyed, settings in ((False, base), (True, keyed)):
            for lanes in (True, False):
                app = create_app(settings.model_copy(update={"fast_lanes": lanes}))
                clients[is_keyed, lanes] = stack.enter_context(TestClient(app))
        yield clients


def answer(client: TestClient, case: Case) -> tuple[int, Any, dict[str, str | None]]:
    """Status, body (JSON when it is JSON) and the headers that carry meaning."""
    content: bytes | Iterator[bytes] | None = case.content or None
    if case.chunked:
        content = iter([case.content[:100], case.content[100:]])
    response = client.request(
        case.method,
        case.url,
        content=content,
        headers=case.headers,
        follow_redirects=False,
    )
    body: Any = response.content
    if response.headers.get("content-type") == "application/json" and body:
        body = json.loads(body)
    headers = {
        name: response.headers.get(name)
        for name in ("content-type", "www-authenticate", "allow", "location")
    }
    return response.status_code, body, headers


def test_the_lanes_answer_exactly_what_the_routes_answer(
    apps: Apps,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    open_lanes = apps[False, True]
    settings = open_lanes.app.state.settings  # type: ignore[attr-defined]
    trained = train_job(open_lanes, sessions, settings)
    running = FakeTraining(sessions, PARAMS)
    running.submit()
    running.claim()
    running.advance(3, end_epoch=0.5)
    queued = open_lanes.post("/jobs", json={}).json()["id"]
    cases = corpus(trained, queued, running.job_id)
    assert len(cases) >= MIN_CASES
    assert len({case.name for case in cases}) == len(cases)
    hits = RouteHits(monkeypatch)

    differences: list[str] = []
    statuses: dict[int, int] = {}
    lane_answered: set[str] = set()
    for case in cases:
        before = hits.count
        with_lanes = answer(apps[case.keyed, True], case)
        answered_by_lane = hits.count == before and with_lanes[0] == 200
        if answered_by_lane:
            lane_answered.add(case.name)
        by_routes = answer(apps[case.keyed, False], case)
        statuses[by_routes[0]] = statuses.get(by_routes[0], 0) + 1
        if with_lanes != by_routes:
            differences.append(f"{case.name}: lanes {with_lanes!r:.300} routes {by_routes!r:.300}")
        assert by_routes[0] != 500, (case.name, by_routes)

    assert differences == [], "\n".join(differences)
    assert len(lane_answered) >= MIN_LANE_ANSWERS, lane_answered
    # A job's polls in every state are the lane's own, the routes the reference.
    assert {"job: trained", "job: queued", "job: running", "poll: plain"} <= lane_answered
    # Every kind of answer is in the corpus: predictions and pages, and each refusal.
    assert {200, 307, 400, 401, 404, 405, 409, 413, 415, 422} <= set(statuses), statuses
    faults = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert faults == []
