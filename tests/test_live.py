"""With real processes: a job's event stream, the CLI watching it, JSON logs from both sides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import sse
from tests.support import REPO_ROOT, SMALL_TEST, SMALL_TRAIN, wait_for
from tests.test_end_to_end import Service, check_series, start_service


@pytest.fixture(scope="module")
def json_service(
    sqlite_template: Path, small_mnist: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One API and one worker for this module, logging JSON; the stream polls often."""
    tmp_path = tmp_path_factory.mktemp("live")
    shutil.copy(sqlite_template, tmp_path / "mnist.db")
    url = f"sqlite:///{tmp_path / 'mnist.db'}"
    yield from start_service(url, small_mnist, tmp_path, events_poll_s="0.1", log_format="json")


def read_events(
    client: httpx.Client, job_id: str, *, last_id: str | None = None, stop: str | None = None
) -> list[sse.Event]:
    """Events until the final status, or until (and including) the first of type ``stop``."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    received: list[sse.Event] = []
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        for event in sse.parse(response.iter_lines()):
            received.append(event)
            if event.event == stop:
                break
    return received


def series(received: list[sse.Event]) -> dict[str, Any]:
    steps = [s for e in received if e.event == "step" for s in e.json()["steps"]]
    epochs = [e.json() for e in received if e.event == "epoch"]
    return {"steps": steps, "epochs": epochs, "status": received[-1].json()["status"]}


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails on any line that is not JSON


def test_a_job_streams_to_its_end_and_resumes_after_a_drop(json_service: Service) -> None:
    client = json_service.client
    body = {"epochs": 3, "batch_size": 32, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
    job_id = client.post("/jobs", json=body).json()["id"]

    # Drop the connection after the first epoch, then resume from the last id received.
    first = read_events(client, job_id, stop="epoch")
    assert first[0].event == "status" and first[-1].event == "epoch"
    rest = read_events(client, job_id, last_id=first[-1].id)
    assert rest[-1].event == "status" and rest[-1].json()["final"] is True

    job = client.get(f"/jobs/{job_id}").json()
    check_series(job, series(first + rest))  # every step once, in order; every epoch
    per_epoch = job["total_steps"] // 3
    for received in (first, rest):
        sent = 0  # each epoch's accuracy comes after its last step
        for event in received:
            if event.event == "step":
                sent = event.json()["steps"][-1]["step"]
            elif event.event == "epoch":
                assert sent == event.json()["epoch"] * per_epoch


def test_a_cancelled_job_ends_its_stream(json_service: Service) -> None:
    client = json_service.client
    body = {"epochs": 60, "batch_size": 8, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
    job_id = client.post("/jobs", json=body).json()["id"]
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        received: list[sse.Event] = []
        for event in sse.parse(response.iter_lines()):
            received.append(event)
            if event.event == "step" and sum(e.event == "step" for e in received) == 1:
                assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert received[-1].event == "status"
    assert received[-1].json()["status"] == "cancelled"
    assert 0 < len(series(received)["steps"]) < 60 * 80


def test_the_cli_watches_a_job_and_both_sides_log_json(json_service: Service) -> None:
    url = str(json_service.client.base_url)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "service.cli", "--url", url, "submit", "--watch"),
            *("--epochs", "2", "--trainset-size", str(SMALL_TRAIN)),
            *("--testset-size", str(SMALL_TEST)),
        ],
        cwd=REPO_ROOT,
        env=json_service.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    job_id, summary = result.stdout.strip().splitlines()
    assert "succeeded" in summary
    assert "epoch 1/2" in result.stderr and "epoch 2/2" in result.stderr
    assert "acc=" in result.stderr

    def epoch_lines() -> list[dict[str, Any]] | None:
        records = json_lines(json_service.logs / "worker.log")
        return [r for r in records if r.get("job_id") == job_id and "epoch" in r] or None

    worker = wait_for(epoch_lines, timeout_s=10, what="the worker's epoch log lines")
    assert [(r["job_id"], r["attempt"], r["epoch"]) for r in worker] == [
        (job_id, 1, 1),
        (job_id, 1, 2),
    ]
    assert all("worker_id" in r for r in worker)
    api = json_lines(json_service.logs / "api.log")
    assert any(f"/jobs/{job_id}/events" in r["message"] for r in api)  # the access log


def test_the_cli_deletes_an_ended_job_on_a_real_api(json_service: Service) -> None:
    """`mnist-service delete` against the real route: 204 → "deleted ID", then 404 → exit 3."""
    url = str(json_service.client.base_url)
    job = {"epochs": 1, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
    job_id = json_service.client.post("/jobs", json=job).json()["id"]
    wait_for(
        lambda: (
            json_service.client.get(f"/jobs/{job_id}").json()["status"]
            in ("succeeded", "failed", "cancelled")
        ),
        timeout_s=120,
        what=f"job {job_id} to end",
    )

    def delete() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "--url", url, "delete", job_id],
            cwd=REPO_ROOT,
            env=json_service.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = delete()
    assert (first.returncode, first.stdout, first.stderr) == (0, f"deleted {job_id}\n", "")
    assert json_service.client.get(f"/jobs/{job_id}").status_code == 404
    again = delete()
    assert again.returncode == 3 and "Traceback" not in again.stderr
    assert job_id in again.stderr


def test_the_cli_runs_a_sweep_to_its_end_on_a_real_api(json_service: Service) -> None:
    """`mnist-service sweep --watch` against real processes: the trials train, the table
    follows them, exit 0, and the promoted alias names the best trial."""
    url = str(json_service.client.base_url)
    params = ["--param", "epochs=1", "--param", f"trainset_size={SMALL_TRAIN}"]
    params += ["--param", f"testset_size={SMALL_TEST}"]
    params += ["--grid", "seed=1,2", "--promote", "live-best", "--watch"]
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "--url", url, "sweep", *params],
        cwd=REPO_ROOT,
        env=json_service.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    sweep_id, summary = done.stdout.strip().splitlines()
    assert f"sweep {sweep_id}: succeeded" in done.stderr
    sweep = json_service.client.get(f"/sweeps/{sweep_id}").json()
    assert sweep["status"] == "succeeded" and summary.startswith(f"sweep {sweep_id} succeeded")
    alias = json_service.client.get("/models/aliases/live-best").json()
    assert alias["job_id"] == sweep["best"]["job_id"]
