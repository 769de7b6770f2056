"""``HEAD`` wherever ``GET`` is answered (:class:`service.api.asgi.HeadAsGet`): the GET's
status and headers, no body; the fast lanes and the routes alike."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.service.api.routes.conftest import BOTH_WAYS

VARYING = {"date", "x-request-id"}


def gettable(job_id: str) -> list[str]:
    return [
        "/",
        "/healthz",
        "/readyz",
        "/jobs",
        f"/jobs/{job_id}",
        f"/jobs/{job_id}/metrics",
        f"/jobs/{job_id}/metrics?after_step=3",
        f"/jobs/{job_id}/metrics.csv",
        f"/models/{job_id}/checkpoint",
        "/jobs/" + "0" * 32,  # a 404 is the GET's 404
        "/jobs?limit=0",  # and a 422 its 422
        "/sweeps",
        "/models",
        "/models/aliases",
        "/workers",
        "/metrics",
        "/openapi.json",
        "/static/app.js",
    ]


@BOTH_WAYS
def test_every_get_answers_head_with_its_status_and_headers(
    client: TestClient, trained: str
) -> None:
    for path in gettable(trained):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code, (path, head.text)
        assert head.content == b"", path
        varying = VARYING | ({"content-length"} if path == "/metrics" else set())  # counts
        same = {k: v for k, v in got.headers.items() if k not in varying}
        assert {k: v for k, v in head.headers.items() if k not in varying} == same, path


@BOTH_WAYS
def test_the_head_of_an_event_stream_ends_with_its_headers(client: TestClient) -> None:
    """A queued job's stream runs until the job ends; its HEAD does not wait for that."""
    job_id = client.post("/jobs", json={}).json()["id"]
    head = client.head(f"/jobs/{job_id}/events")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize("path", ["/jobs/{job}/cancel", "/sweeps/{job}/cancel", "/predict"])
def test_head_where_no_get_is_405_naming_what_is(client: TestClient, path: str) -> None:
    head = client.head(path.format(job="0" * 32))
    assert head.status_code == 405 and "GET" not in head.headers["allow"]


def test_allow_names_head_wherever_get_is(client: TestClient) -> None:
    refused = client.put("/jobs")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD, POST"


def test_a_head_is_counted_under_its_route(client: TestClient) -> None:
    client.head("/jobs")
    scraped = client.get("/metrics").text
    assert 'method="HEAD",route="/jobs",status="200"' in scraped
