"""GET /jobs/{id}/events read by a client people use (httpx-sse) from a real server and worker.

Every event carries JSON data (the reconnection delay rides on the first one), no id repeats
within a stream or across a reconnection, and a reconnection after the final event gets 204.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.support import SMALL_TEST, SMALL_TRAIN
from tests.test_end_to_end import Service, start_service


@pytest.fixture
def service(sqlite_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[Service]:
    yield from start_service(sqlite_url, small_mnist, tmp_path, events_poll_s="0.2")


def follow(client: httpx.Client, job_id: str, last_id: str | None = None) -> list[dict[str, Any]]:
    """The stream's events as httpx-sse hands them over, each data decoded as JSON."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    received = []
    with connect_sse(client, "GET", f"/jobs/{job_id}/events", headers=headers) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            received.append(
                {"event": sse.event, "id": sse.id, "retry": sse.retry, "data": json.loads(sse.data)}
            )
    return received


def steps_of(received: list[dict[str, Any]]) -> list[int]:
    return [s["step"] for e in received if e["event"] == "step" for s in e["data"]["steps"]]


def test_httpx_sse_reads_json_events_with_unique_ids_and_a_204_after_the_end(
    service: Service,
) -> None:
    client = service.client
    body = {"epochs": 2, "batch_size": 32, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
    job_id = client.post("/jobs", json=body).json()["id"]

    everything = follow(client, job_id)  # from the job's start (queued, most likely) to its end
    assert everything[0]["event"] == "status" and everything[0]["retry"] == 1000
    assert all(e["retry"] is None for e in everything[1:])
    final = everything[-1]
    assert final["event"] == "status" and final["data"]["final"] is True
    assert final["data"]["status"] == "succeeded", final
    assert steps_of(everything) == list(range(1, 41))
    ids = [e["id"] for e in everything]
    assert None not in ids and len(set(ids)) == len(ids), ids

    # Reconnecting from the first epoch: only what followed, under ids not seen before.
    first_epoch = next(i for i, e in enumerate(everything) if e["event"] == "epoch")
    resumed = follow(client, job_id, last_id=ids[first_epoch])
    assert steps_of(resumed) == list(range(21, 41))
    assert resumed[0]["event"] == "status" and resumed[-1]["data"]["final"] is True
    seen = ids[: first_epoch + 1] + [e["id"] for e in resumed]
    assert len(set(seen)) == len(seen), seen

    # After the final event there is nothing left: 204, which ends a browser's reconnections.
    for final_id in (ids[-1], resumed[-1]["id"]):
        ended = client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": final_id})
        assert (ended.status_code, ended.content) == (204, b""), final_id
