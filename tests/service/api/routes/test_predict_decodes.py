"""Predict decodes in a bounded number of slots, whichever path (route or fast lane) decodes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.serving import imaging
from service.settings import Settings
from tests.service.images import png
from tests.service.serving.test_decode_slots import InFlight
from tests.support import synthetic_digits, together

RAW = {"content-type": "image/png"}


@pytest.fixture
def slow_decodes(monkeypatch: pytest.MonkeyPatch) -> InFlight:
    """Every image decode takes 0.15 s longer, and is counted while it runs."""
    fake = InFlight(0.15)
    decode = imaging.decode

    def slow(data: bytes, **options: Any) -> np.ndarray:
        fake.decode()
        return decode(data, **options)

    monkeypatch.setattr(imaging, "decode", slow)
    return fake


@pytest.fixture
def api_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The app's settings with the test's overrides (``limits``)."""
    return settings.model_copy(update=request.param)


def limits(**overrides: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("api_settings", [overrides], indirect=True, ids=[""])


def images() -> tuple[bytes, bytes]:
    """One image the fast lane decodes (28×28), one it leaves to the route (200×200)."""
    digit = synthetic_digits(1, seed=51)[0][0]
    large = np.zeros((200, 200), np.uint8)
    large[40:160, 90:110] = 255
    return png(digit), png(large)


@pytest.mark.parametrize(
    "api_settings",
    [{"max_decodes": 1, "fast_lanes": True}, {"max_decodes": 2, "fast_lanes": True}],
    indirect=True,
    ids=["1 slot", "2 slots"],
)
def test_route_and_lane_decode_in_the_same_few_slots(
    client: TestClient, trained: str, api_settings: Settings, slow_decodes: InFlight
) -> None:
    small, large = images()
    calls = [lambda: client.post("/predict", content=large, headers=RAW)] * 4
    calls += [lambda: client.post("/predict", content=small, headers=RAW)] * 4
    answers = together(calls)
    assert [a.status_code for a in answers] == [200] * 8
    # 4 small images decoded by the lane; 4 large ones tried by the lane (refused by their
    # header's size) and decoded by the route.
    assert slow_decodes.done == 12
    # With one slot the lane's decodes (on the loop) wait for the route's (on threads).
    assert slow_decodes.peak == api_settings.max_decodes


@limits(max_decodes=2, fast_lanes=False)
def test_the_route_alone_keeps_to_its_slots(
    client: TestClient, trained: str, slow_decodes: InFlight
) -> None:
    _, large = images()
    answers = together([lambda: client.post("/predict", content=large, headers=RAW)] * 6)
    assert [a.status_code for a in answers] == [200] * 6
    assert slow_decodes.peak == 2 and slow_decodes.done == 6


@limits(max_decodes=1, max_decode_queue=1)
def test_past_the_waiting_bound_predict_answers_429_with_retry_after(
    client: TestClient, trained: str, slow_decodes: InFlight
) -> None:
    _, large = images()
    answers = together([lambda: client.post("/predict", content=large, headers=RAW)] * 6)
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 2 and set(codes) == {200, 429}, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "too_many_requests"
    assert slow_decodes.peak == 1
