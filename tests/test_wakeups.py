"""With real processes, both databases: wake-ups carry a job from ``POST /jobs`` to the final
event of its stream, and polling alone still does when they are off.

The API and the worker poll every 60 s here: a job claimed, trained and streamed to its end
well within that was carried by wake-ups (the worker's claim and every event after the
stream's first read). Nothing asserts a tight time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service import sse
from tests.support import SMALL_TEST, SMALL_TRAIN, api_server, local_env, process, wait_for
from tests.test_end_to_end import check_series
from tests.test_live import read_events, series

POLL_S = 60.0  # how often each side would look without a wake-up
WITHIN_S = 40.0  # ...so an end reached within this needed them


def start(db_url: str, data: Path, tmp_path: Path, **settings: str) -> Iterator[httpx.Client]:
    env = local_env(db_url, data, tmp_path, torch_threads="1", **settings)
    with (
        api_server(env, tmp_path / "api.log") as client,
        process(["-m", "workers"], env, tmp_path / "worker.log"),
    ):
        # Once the worker is registered it has looked at the (empty) queue: it now idles.
        wait_for(
            lambda: client.get("/workers").json()["workers"] or None,
            timeout_s=60,
            what="the worker to register",
        )
        yield client


@pytest.fixture
def woken(db_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[httpx.Client]:
    poll = str(POLL_S)
    yield from start(db_url, small_mnist, tmp_path, poll_interval_s=poll, events_poll_s=poll)


@pytest.fixture
def polling(db_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[httpx.Client]:
    yield from start(
        db_url, small_mnist, tmp_path, wakeups="false", poll_interval_s="0.2", events_poll_s="0.2"
    )


def run_and_follow(client: httpx.Client) -> tuple[dict[str, object], list[sse.Event], float]:
    body = {"epochs": 3, "batch_size": 32, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
    started = time.monotonic()
    job_id = client.post("/jobs", json=body).json()["id"]
    received = read_events(client, job_id)
    took = time.monotonic() - started
    return client.get(f"/jobs/{job_id}").json(), received, took


def test_wake_ups_carry_a_job_to_its_last_event_without_polling(woken: httpx.Client) -> None:
    job, received, took = run_and_follow(woken)
    assert received[-1].event == "status" and received[-1].json()["final"] is True
    assert took < WITHIN_S, f"{took:.1f} s: the job or its stream waited for a poll"
    check_series(job, series(received))  # every step once, in order; every epoch
    assert len([e for e in received if e.event == "epoch"]) == 3


def test_with_wake_ups_off_polling_still_carries_the_job(polling: httpx.Client) -> None:
    job, received, _ = run_and_follow(polling)
    assert received[-1].json()["final"] is True
    check_series(job, series(received))
