"""The predict endpoint with a model trained by a real worker on the generated digits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from tests.support import SMALL_TEST, SMALL_TRAIN, synthetic_digits
from workers.worker import Worker


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def train_job(client: TestClient, sessions: sessionmaker[Session], settings: Settings) -> str:
    body = {"epochs": 2, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "seed": 3}
    job_id: str = client.post("/jobs", json=body).json()["id"]
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    return job_id


def test_no_model_yet_is_409(client: TestClient) -> None:
    response = client.post("/predict", files={"file": ("d.png", png(np.zeros((28, 28), np.uint8)))})
    assert response.status_code == 409
    assert "no trained model yet" in response.json()["error"]["message"]


def test_predictions_agree_with_the_labels(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    job_id = train_job(client, sessions, api_settings)
    images, labels = synthetic_digits(100, seed=99)  # not the training images
    correct = 0
    for image, label in zip(images, labels, strict=True):
        response = client.post("/predict", files={"file": ("d.png", png(image), "image/png")})
        assert response.status_code == 200
        answer = response.json()
        assert answer["job_id"] == job_id
        assert len(answer["probabilities"]) == 10
        assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert answer["digit"] == int(np.argmax(answer["probabilities"]))
        correct += answer["digit"] == label
    assert correct >= 90

    explicit = client.post(
        f"/predict?job_id={job_id}", files={"file": ("d.png", png(images[0]))}
    ).json()
    assert explicit["job_id"] == job_id


def test_predict_errors(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    train_job(client, sessions, api_settings)
    digit = png(synthetic_digits(1, seed=5)[0][0])

    unknown = client.post(
        "/predict?job_id=0123456789abcdef0123456789abcdef", files={"file": ("d.png", digit)}
    )
    assert unknown.status_code == 404
    queued = client.post("/jobs", json={}).json()["id"]
    not_trained = client.post(f"/predict?job_id={queued}", files={"file": ("d.png", digit)})
    assert not_trained.status_code == 409
    assert "has no trained model" in not_trained.json()["error"]["message"]
    assert client.post("/predict?job_id=nope", files={"file": ("d.png", digit)}).status_code == 422

    garbage = client.post("/predict", files={"file": ("d.png", b"\x00\x01garbage" * 10)})
    assert garbage.status_code == 415
    assert "not an image" in garbage.json()["error"]["message"]
    empty = client.post("/predict", files={"file": ("d.png", b"")})
    assert empty.status_code == 422
    assert "empty" in empty.json()["error"]["message"]
    truncated = client.post("/predict", files={"file": ("d.png", digit[: len(digit) // 2])})
    assert truncated.status_code == 422
    missing = client.post("/predict", data={"other": "x"})
    assert missing.status_code == 422
    assert "file" in missing.json()["error"]["message"]
    # The server still answers after all that.
    assert client.post("/predict", files={"file": ("d.png", digit)}).status_code == 200


def test_uploads_over_the_cap_are_413(client: TestClient, api_settings: Settings) -> None:
    too_big = b"\x89PNG" + b"\x00" * api_settings.max_upload_bytes
    response = client.post("/predict", files={"file": ("d.png", too_big)})
    assert response.status_code == 413
