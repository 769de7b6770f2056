"""Predict's fast lane in the app: it answers the common request, the route everything else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.api.lanes.predict import LANE_MAX_BODY_BYTES, LANE_MAX_PIXELS
from service.api.routes import predict as predict_route
from service.settings import Settings
from tests.service.api.routes.conftest import train_job
from tests.service.images import png
from tests.support import synthetic_digits

RAW = {"content-type": "image/png"}


@pytest.fixture
def route_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One entry per request the route (not the lane) read."""
    calls: list[str] = []
    read_input = predict_route._read_input

    async def counted(*args: Any) -> Any:
        calls.append("route")
        return await read_input(*args)

    monkeypatch.setattr(predict_route, "_read_input", counted)
    return calls


def test_the_lane_answers_one_small_image_and_the_route_the_rest(
    client: TestClient, trained: str, route_calls: list[str]
) -> None:
    digit = synthetic_digits(1, seed=31)[0][0]
    data = png(digit)
    by_lane = [
        client.post("/predict", content=data, headers=RAW),
        client.post("/predict", files={"file": ("d.png", data, "image/png")}),
        client.post(f"/predict?job_id={trained}&top_k=3", content=data, headers=RAW),
    ]
    assert [r.status_code for r in by_lane] == [200] * 3
    assert route_calls == []
    by_route = [
        client.post("/predict", json={"pixels": digit.tolist()}),
        client.post("/predict", files=[("files", ("d.png", data, "image/png"))]),
        client.post("/predict?top_k=03", content=data, headers=RAW),  # the route reads 03 as 3
    ]
    assert [r.status_code for r in by_route] == [200] * 3
    assert route_calls == ["route"] * 3

    # The same answers, to the last bit: each was a batch of one.
    plain = by_lane[0].json()
    assert plain == by_lane[1].json() == by_route[0].json() == by_route[1].json()["predictions"][0]
    assert plain["job_id"] == trained and "top_k" not in plain
    assert by_lane[2].json() == by_route[2].json()
    assert by_lane[2].json()["top_k"][0]["digit"] == plain["digit"]
    assert by_lane[0].headers["content-type"] == "application/json"
    assert by_lane[0].headers["x-request-id"]  # the middlewares apply as to any route


def test_what_the_lane_cannot_answer_the_route_answers_from_the_replayed_body(
    client: TestClient, trained: str, route_calls: list[str]
) -> None:
    data = png(synthetic_digits(1, seed=32)[0][0])
    corrupt = client.post("/predict", content=data[: len(data) // 2], headers=RAW)
    assert corrupt.status_code == 422
    assert "could not be decoded" in corrupt.json()["error"]["message"]
    empty = client.post("/predict", files={"file": ("d.png", b"", "image/png")})
    assert empty.status_code == 422 and "empty" in empty.json()["error"]["message"]
    unknown = client.post("/predict?model=nope", content=data, headers=RAW)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
    assert route_calls == ["route"] * 3

    side = int(LANE_MAX_PIXELS**0.5) + 1  # decoded in the thread pool instead
    large = np.zeros((side, side), np.uint8)
    large[side // 4 : 3 * side // 4, side // 2 - 3 : side // 2 + 3] = 255  # a "1"
    assert client.post("/predict", content=png(large), headers=RAW).status_code == 200
    noisy = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    assert len(png(noisy)) > LANE_MAX_BODY_BYTES
    assert client.post("/predict", content=png(noisy), headers=RAW).status_code == 200
    assert route_calls == ["route"] * 5


def test_lane_answers_are_counted_under_the_predict_route(
    client: TestClient, trained: str, route_calls: list[str]
) -> None:
    data = png(synthetic_digits(1, seed=33)[0][0])
    for _ in range(3):
        assert client.post("/predict", content=data, headers=RAW).status_code == 200
    assert route_calls == []
    exposition = client.get("/metrics").text
    assert 'mnist_http_requests_total{method="POST",route="/predict",status="200"} 3.0' in (
        exposition
    )


@pytest.fixture
def keyed_client(api_settings: Settings) -> Iterator[TestClient]:
    settings = Settings.model_validate({**api_settings.model_dump(), "api_key": "k" * 32})
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_lane_is_behind_the_api_key(
    keyed_client: TestClient,
    sessions: sessionmaker[Session],
    api_settings: Settings,
    route_calls: list[str],
) -> None:
    keyed_client.headers["authorization"] = "Bearer " + "k" * 32
    train_job(keyed_client, sessions, api_settings)
    data = png(synthetic_digits(1, seed=34)[0][0])
    assert keyed_client.post("/predict", content=data, headers=RAW).status_code == 200
    del keyed_client.headers["authorization"]
    refused = keyed_client.post("/predict", content=data, headers=RAW)
    assert refused.status_code == 401
    assert route_calls == []


def test_an_alias_moved_through_the_api_answers_the_next_prediction(
    client: TestClient,
    sessions: sessionmaker[Session],
    api_settings: Settings,
) -> None:
    first = train_job(client, sessions, api_settings)
    second = train_job(client, sessions, api_settings)
    data = png(synthetic_digits(1, seed=35)[0][0])
    ask: Callable[[], str] = lambda: client.post(  # noqa: E731
        "/predict", content=data, headers=RAW
    ).json()["job_id"]
    assert ask() == second  # the newest, now remembered for a second
    assert client.put("/models/aliases/production", json={"job_id": first}).status_code == 200
    assert ask() == first
    assert client.delete("/models/aliases/production").status_code == 204
    assert ask() == second
