"""End to end with real processes: uvicorn serving the API, worker processes training."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from torchvision.datasets import MNIST

from tests.support import (
    REPO_ROOT,
    SMALL_TEST,
    SMALL_TRAIN,
    api_server,
    free_port,
    local_env,
    process,
    synthetic_digits,
    wait_for,
)

TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Service:
    client: httpx.Client
    env: dict[str, str]
    logs: Path


def start_service(
    db_url: str, data_dir: Path, tmp_path: Path, **settings: str
) -> Iterator[Service]:
    """The API and one worker on CPU; ``settings`` adds MNIST_* settings for both."""
    env = local_env(
        db_url,
        data_dir,
        tmp_path,
        poll_interval_s="0.1",
        **settings,
    )
    with (
        api_server(env, tmp_path / "api.log") as client,
        process(["-m", "workers"], env, tmp_path / "worker.log"),
    ):
        yield Service(client, env, tmp_path)


@pytest.fixture
def small_service(db_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[Service]:
    yield from start_service(db_url, small_mnist, tmp_path)


@pytest.fixture
def real_service(db_url: str, real_mnist: Path, tmp_path: Path) -> Iterator[Service]:
    yield from start_service(db_url, real_mnist, tmp_path)


def follow_metrics(service: Service, job_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll /metrics with after_step as a client would; return every step seen and the end."""
    steps: list[dict[str, Any]] = []
    after = 0
    last: dict[str, Any] = {}

    def poll() -> bool:
        nonlocal after, last
        response = service.client.get(f"/jobs/{job_id}/metrics", params={"after_step": after})
        assert response.status_code == 200
        last = response.json()
        steps.extend(last["steps"])
        after = last["next_after_step"]
        # The status is read before the steps: once it is terminal, no step can be missing.
        return last["status"] in TERMINAL and not last["steps"]

    worker_log = service.logs / "worker.log"
    wait_for(poll, timeout_s=timeout_s, what=f"job {job_id} to end; worker log: {worker_log}")
    return {"steps": steps, "epochs": last["epochs"], "status": last["status"]}


def as_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_series(job: dict[str, Any], seen: dict[str, Any]) -> None:
    assert seen["status"] == "succeeded", job
    steps = [s["step"] for s in seen["steps"]]
    assert steps == list(range(1, job["total_steps"] + 1))  # no gap, no duplicate
    assert [e["epoch"] for e in seen["epochs"]] == list(range(1, job["params"]["epochs"] + 1))
    n = job["params"]["trainset_size"]
    assert seen["steps"][-1]["examples_seen"] == n * job["params"]["epochs"]
    assert [e["examples_seen"] for e in seen["epochs"]] == [
        n * e for e in range(1, job["params"]["epochs"] + 1)
    ]


def test_submit_train_poll_predict_on_generated_digits(small_service: Service) -> None:
    client = small_service.client
    body = {"epochs": 2, "batch_size": 32, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
    created = client.post("/jobs", json=body)
    assert created.status_code == 202
    job_id = created.json()["id"]
    seen = follow_metrics(small_service, job_id, timeout_s=120)
    job = client.get(f"/jobs/{job_id}").json()
    check_series(job, seen)
    assert job["step"] == job["total_steps"] == 40 and job["epoch"] == 2
    assert job["device"] == "cpu" and job["accuracy"] == seen["epochs"][-1]["accuracy"]

    images, labels = synthetic_digits(50, seed=1234)
    answers = [
        client.post("/predict", files={"file": ("d.png", as_png(Image.fromarray(img)))}).json()
        for img in images
    ]
    assert all(a["job_id"] == job_id for a in answers)
    assert sum(a["digit"] == y for a, y in zip(answers, labels, strict=True)) >= 45


def test_progress_is_visible_while_the_job_runs(small_service: Service) -> None:
    client = small_service.client
    body = {"epochs": 60, "batch_size": 8, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
    job_id = client.post("/jobs", json=body).json()["id"]

    def midway() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] == "running" and 0 < job["step"] < job["total_steps"] else None

    job = wait_for(midway, timeout_s=60, what="a running job with some steps done")
    assert job["started_at"] is not None and job["worker"] is not None
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    seen = follow_metrics(small_service, job_id, timeout_s=30)
    assert seen["status"] == "cancelled"


@pytest.mark.real_data
def test_the_tutorial_job_on_real_mnist(real_service: Service, real_mnist: Path) -> None:
    client = real_service.client
    job_id = client.post("/jobs", json={"seed": 0}).json()["id"]
    seen = follow_metrics(real_service, job_id, timeout_s=600)
    job = client.get(f"/jobs/{job_id}").json()
    check_series(job, seen)
    assert job["total_steps"] == 471
    assert seen["epochs"][0]["accuracy"] > 0.80  # the tutorial's expectation after epoch 1

    # Test images the job never validated on (it used the first 1,000), sent as PNG files.
    test_split = MNIST(str(real_mnist), train=False, download=False)
    indices = range(1000, 2000)
    correct = 0
    for i in indices:
        image, label = test_split[i]
        response = client.post("/predict", files={"file": (f"{i}.png", as_png(image), "image/png")})
        assert response.status_code == 200
        correct += response.json()["digit"] == label
    assert abs(correct / len(indices) - job["accuracy"]) < 0.04, (correct, job["accuracy"])


def test_run_starts_api_and_worker_and_ctrl_c_stops_both(
    sqlite_url: str, small_mnist: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = local_env(
        sqlite_url,
        small_mnist,
        tmp_path,
        port=str(port),
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

                def trained() -> bool:
                    try:
                        jobs = client.get("/jobs").json()["jobs"]
                    except httpx.TransportError:
                        return False
                    return bool(jobs) and jobs[0]["status"] == "succeeded"

                wait_for(lambda: proc.poll() is None and _up(client), timeout_s=60, what="the API")
                body = {"epochs": 1, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
                assert client.post("/jobs", json=body).status_code == 202
                wait_for(trained, timeout_s=120, what="the worker started by `run` to train")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log.read_text()
    assert f"http://127.0.0.1:{port}/docs" in output
    assert "worker" in output and "stopped" in output


def _up(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False
