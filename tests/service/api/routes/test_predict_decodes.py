"""Predict decodes in a bounded number of slots, whichever path (route or fast lane) decodes."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any, cast

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.serving import imaging
from service.settings import Settings
from tests.service.images import png
from tests.support import synthetic_digits, wait_for

RAW = {"content-type": "image/png"}


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
    client: TestClient, trained: str, api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The route's decodes take every slot and are held there; a small image, which the lane
    # decodes on the event loop, then waits for one of them: the two paths share the slots.
    held = HeldDecodes(monkeypatch)
    slots = cast(Any, client.app).state.predictor.decodes
    small, large = images()
    answers: list[int] = []
    taken = api_settings.max_decodes
    posts = [
        threading.Thread(target=post_into, args=(client, large, answers)) for _ in range(taken)
    ]
    lane = threading.Thread(target=post_into, args=(client, small, answers))
    try:
        for thread in posts:
            thread.start()
        wait_for(lambda: held.now == taken, timeout_s=30, what="the route's decodes in every slot")
        lane.start()
        wait_for(lambda: slots.waiting == 1, timeout_s=30, what="the lane's decode to wait")
        assert lane.is_alive() and held.done == 0
    finally:
        held.release.set()
        for thread in (*posts, lane):
            thread.join(timeout=60)
    assert answers == [200] * (taken + 1)
    # Each large image was tried by the lane (on the loop) and left to the route: held there.
    assert held.peak == taken and held.done == taken
    assert held.loop_decodes == taken + 1  # the large ones' tries and the small one


@limits(max_decodes=2, fast_lanes=False)
def test_the_route_alone_keeps_to_its_slots(
    client: TestClient, trained: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldDecodes(monkeypatch)
    slots = cast(Any, client.app).state.predictor.decodes
    _, large = images()
    answers: list[int] = []
    posts = [threading.Thread(target=post_into, args=(client, large, answers)) for _ in range(6)]
    try:
        for thread in posts:
            thread.start()
        # Both slots taken, the other four waiting: no more decode, whatever the timing.
        wait_for(
            lambda: held.now == 2 and slots.waiting == 4,
            timeout_s=30,
            what="two decodes and four waiting",
        )
    finally:
        held.release.set()
        for thread in posts:
            thread.join(timeout=60)
    assert answers == [200] * 6
    assert held.peak == 2 and held.done == 6


def on_event_loop() -> bool:
    """Whether this thread runs an event loop (the lane decodes there, the route in threads)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class HeldDecodes:
    """Every decode on a thread (the route's) held until :attr:`release` is set, counted while
    it runs: a test decides which requests overlap, instead of hoping that they do. The lane's
    decodes on the event loop pass (holding one would hold the loop itself)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.now = self.peak = self.done = 0
        self.loop_decodes = 0  # the lane's, on the event loop, not held
        self._lock = threading.Lock()
        self._decode = imaging.decode
        monkeypatch.setattr(imaging, "decode", self.decode)

    def decode(self, data: bytes, **options: Any) -> np.ndarray:
        if on_event_loop():
            self.loop_decodes += 1
            return self._decode(data, **options)
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            assert self.release.wait(30), "the test never released the decodes"
            return self._decode(data, **options)
        finally:
            with self._lock:
                self.now -= 1
                self.done += 1


def post_into(client: TestClient, image: bytes, answers: list[int]) -> None:
    """POST the image to /predict; its status into ``answers``."""
    answers.append(client.post("/predict", content=image, headers=RAW).status_code)


@limits(max_decodes=1, max_decode_queue=1)
def test_past_the_waiting_bound_predict_answers_429_with_retry_after(
    client: TestClient, trained: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race is the test's own: one request holds the slot until released, a second is seen
    # waiting for it, and only then does a third come.
    held = HeldDecodes(monkeypatch)
    slots = cast(Any, client.app).state.predictor.decodes
    _, large = images()
    answers: list[int] = []
    first, second = (
        threading.Thread(target=post_into, args=(client, large, answers)) for _ in range(2)
    )
    try:
        first.start()
        wait_for(lambda: held.now == 1, timeout_s=30, what="the first decode to hold the slot")
        second.start()
        wait_for(lambda: slots.waiting == 1, timeout_s=30, what="the second to wait for it")
        refused = client.post("/predict", content=large, headers=RAW)
    finally:
        held.release.set()
        first.join(timeout=60)
        second.join(timeout=60)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "too_many_requests"
    assert answers == [200, 200]  # the one decoding and the one waiting were answered
    assert held.peak == 1


class OneAtATime:
    """Every decode on a thread waits for a turn the test gives (:meth:`allow`), and says which
    image it is (its bytes' length) as it starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.turns = threading.Semaphore(0)
        self.started: list[int] = []
        self._decode = imaging.decode
        monkeypatch.setattr(imaging, "decode", self.decode)

    def decode(self, data: bytes, **options: Any) -> np.ndarray:
        self.started.append(len(data))
        assert self.turns.acquire(timeout=30), "the test never gave this decode its turn"
        return self._decode(data, **options)

    def allow(self) -> None:
        self.turns.release()


def form_of(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]


@limits(max_decodes=1, fast_lanes=False)
def test_a_form_of_many_images_takes_its_turns_one_image_at_a_time(
    client: TestClient, trained: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that comes while a form's first image decodes is decoded before the form's
    second: the form held its slot through all of its images, and small requests waited for
    the whole form (16 large images: tens of seconds here)."""
    turns = OneAtATime(monkeypatch)
    slots = cast(Any, client.app).state.predictor.decodes
    small, large = images()
    bigger = png(np.pad(np.asarray(Image.open(io.BytesIO(large))), 20))
    answers: dict[str, int] = {}

    def post_form() -> None:
        answers["form"] = client.post("/predict", files=form_of(large, bigger)).status_code

    def post_one() -> None:
        answers["one"] = client.post("/predict", content=small, headers=RAW).status_code

    form, one = threading.Thread(target=post_form), threading.Thread(target=post_one)
    try:
        form.start()
        wait_for(lambda: turns.started == [len(large)], timeout_s=30, what="the form's first")
        one.start()
        wait_for(lambda: slots.waiting == 1, timeout_s=30, what="the other request to wait")
        turns.allow()  # the form's first image ends
        wait_for(lambda: len(turns.started) == 2, timeout_s=30, what="the next decode")
        assert turns.started[1] == len(small)  # its turn came before the form's second image
    finally:
        for _ in range(3):
            turns.allow()
        for thread in (form, one):
            if thread.ident is not None:
                thread.join(timeout=60)
    assert answers == {"form": 200, "one": 200}
    assert turns.started == [len(large), len(small), len(bigger)]
