"""Predict's fast lane in the app: it answers the common request, the route everything else.

Every test runs with the lanes on and off (``BOTH_WAYS``): the answers are the same, and only
who gives them differs.
"""

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
from tests.service.api.routes.conftest import BOTH_WAYS, train_job
from tests.service.images import png
from tests.support import synthetic_digits

pytestmark = BOTH_WAYS

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
    client: TestClient, trained: str, route_calls: list[str], fast_lanes: bool
) -> None:
    digit = synthetic_digits(1, seed=31)[0][0]
    data = png(digit)
    by_lane = [
        client.post("/predict", content=data, headers=RAW),
        client.post("/predict", files={"file": ("d.png", data, "image/png")}),
        client.post(f"/predict?job_id={trained}&top_k=3", content=data, headers=RAW),
        # The lane reads the query with the route's own model: 03 is 3 for both.
        client.post("/predict?top_k=03", content=data, headers=RAW),
    ]
    assert [r.status_code for r in by_lane] == [200] * 4
    assert route_calls == ([] if fast_lanes else ["route"] * 4)
    route_calls.clear()
    by_route = [
        client.post("/predict", json={"pixels": digit.tolist()}),
        client.post("/predict", files=[("files", ("d.png", data, "image/png"))]),
    ]
    assert [r.status_code for r in by_route] == [200] * 2
    assert route_calls == ["route"] * 2

    # The same answers, to the last bit: each was a batch of one.
    plain = by_lane[0].json()
    assert plain == by_lane[1].json() == by_route[0].json() == by_route[1].json()["predictions"][0]
    assert plain["job_id"] == trained and "top_k" not in plain
    assert by_lane[2].json() == by_lane[3].json()
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
    client: TestClient, trained: str, route_calls: list[str], fast_lanes: bool
) -> None:
    data = png(synthetic_digits(1, seed=33)[0][0])
    for _ in range(3):
        assert client.post("/predict", content=data, headers=RAW).status_code == 200
    assert route_calls == ([] if fast_lanes else ["route"] * 3)
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
    fast_lanes: bool,
) -> None:
    keyed_client.headers["authorization"] = "Bearer " + "k" * 32
    train_job(keyed_client, sessions, api_settings)
    data = png(synthetic_digits(1, seed=34)[0][0])
    assert keyed_client.post("/predict", content=data, headers=RAW).status_code == 200
    del keyed_client.headers["authorization"]
    refused = keyed_client.post("/predict", content=data, headers=RAW)
    assert refused.status_code == 401
    assert route_calls == ([] if fast_lanes else ["route"])


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


def form_with_epilogue(image: bytes, epilogue: bytes) -> tuple[bytes, dict[str, str]]:
    """A form of the one file ``file``, then ``epilogue`` after its closing delimiter."""
    body = (
        b"--b0undary\r\n"
        b'Content-Disposition: form-data; name="file"; filename="d.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b0undary--\r\n" + epilogue
    )
    return body, {"content-type": "multipart/form-data; boundary=b0undary"}


def test_the_body_limits_come_before_the_lane(
    client: TestClient, trained: str, api_settings: Settings, route_calls: list[str]
) -> None:
    # The limits once sat behind the lane, which answered a body they would have refused.
    small = api_settings.model_copy(update={"max_upload_bytes": 2048, "max_request_bytes": 4096})
    data = png(synthetic_digits(1, seed=36)[0][0])
    assert len(data) < 2048
    with TestClient(create_app(small)) as limited:
        over, headers = form_with_epilogue(data, b"x" * 30_000)
        refused = limited.post("/predict", content=over, headers=headers)
        assert refused.status_code == 413, refused.text
        assert "4096 bytes" in refused.json()["error"]["message"]
        # Under the cap, data after the closing delimiter is the epilogue, which python-multipart
        # skips: the route reads the form and so may the lane.
        under, headers = form_with_epilogue(data, b"x" * 1000)
        answered = limited.post("/predict", content=under, headers=headers)
        assert answered.status_code == 200, answered.text
        assert answered.json()["job_id"] == trained
        odd = under.replace(b"Content-Type: image/png", b"Content Type: image/png")
        malformed = limited.post("/predict", content=odd, headers=headers)
        assert malformed.status_code == 400, malformed.text  # python-multipart's, for both
    assert route_calls == ([] if small.fast_lanes else ["route"] * 2)
