"""GET /jobs/{id}/events in a real browser: Chromium's own EventSource, not the dashboard's code.

An EventSource that is never closed reconnects whenever a stream ends; after the final event
the server must answer its reconnection with 204, which makes it stop for good. Reuses the
browser test's Chromium and fixtures (and skips where they are missing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from tests import test_browser
from tests.support import wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page, Request, Response

# The browser test's skip (no Chromium or Playwright) and its fixtures: the data set, a served
# dashboard (the API and a worker) and a Chromium page on it that fails on any script error.
pytestmark = test_browser.pytestmark
mnist_dir = test_browser.mnist_dir
dashboard = test_browser.dashboard
page = test_browser.page

TERMINAL = {"succeeded", "failed", "cancelled"}
TINY_JOB = {"epochs": 1, "batch_size": 32, "trainset_size": 64, "testset_size": 50}

FOLLOW = """(url) => {
    window.received = [];
    const source = new EventSource(url);
    window.source = source;
    for (const type of ["status", "step", "epoch"]) {
        source.addEventListener(type, (event) => {
            // JSON.parse throws on data that is not JSON: a page error fails the test.
            window.received.push({type, id: event.lastEventId, data: JSON.parse(event.data)});
        });
    }
}"""


def test_an_eventsource_stops_reconnecting_after_the_final_event(
    page: Page, dashboard: str
) -> None:
    with httpx.Client(base_url=dashboard, timeout=30) as client:
        job_id = client.post("/jobs", json=TINY_JOB).json()["id"]

        def ended() -> bool:
            return client.get(f"/jobs/{job_id}").json()["status"] in TERMINAL

        wait_for(ended, timeout_s=120, what=f"job {job_id} to end")

    requests: list[Request] = []
    statuses: list[int] = []

    def on_request(request: Request) -> None:
        if request.resource_type == "eventsource":
            requests.append(request)

    def on_response(response: Response) -> None:
        if response.request.resource_type == "eventsource":
            statuses.append(response.status)

    page.on("request", on_request)
    page.on("response", on_response)
    page.evaluate(FOLLOW, f"/jobs/{job_id}/events")
    # The stream delivers everything and ends; the browser reconnects once with the final
    # event's id, gets 204 and closes: it never reconnects again (the standard's rule for a
    # failed connection). Without the 204 it would reconnect every second and never close.
    page.wait_for_function("() => window.source.readyState === EventSource.CLOSED")

    received: list[dict[str, Any]] = page.evaluate("() => window.received")
    finals = [e for e in received if e["type"] == "status" and e["data"]["final"]]
    assert len(finals) == 1 and received[-1] is not None and received[-1] == finals[0]
    ids = [e["id"] for e in received]
    assert len(set(ids)) == len(ids), ids
    # One connection, and one reconnection after the end (what the network stack sent).
    resumed_from = [r.all_headers().get("last-event-id") for r in requests]
    assert resumed_from == [None, finals[0]["id"]]
    assert statuses == [200, 204]
