"""DELETE /jobs/{id} through the app: what goes, what is refused, and that predict forgets the
model at once; and POST /jobs's storage budget (MNIST_MAX_JOB_STEPS)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.settings import Settings
from service.store.tables import Job
from tests.service.images import png
from tests.support import BOTH_STORES, stored, synthetic_digits


def digit() -> bytes:
    images, _ = synthetic_digits(1, seed=5)
    return png(images[0])


@BOTH_STORES
def test_a_trained_job_is_deleted_with_its_checkpoint_and_predict_forgets_it(
    client: TestClient, trained: str, api_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    predict = f"/predict?job_id={trained}"
    assert client.post(predict, files={"file": ("d.png", digit())}).status_code == 200
    with sessions() as session:
        job = session.get(Job, trained)
        assert job is not None and job.checkpoint is not None
        checkpoint = job.checkpoint
    models = client.app.state.predictor.models  # type: ignore[attr-defined]
    assert models.peek(checkpoint) is not None  # loaded and cached by the prediction
    assert stored(api_settings, sessions, checkpoint)

    response = client.delete(f"/jobs/{trained}")

    assert response.status_code == 204 and response.content == b""
    assert "content-type" not in response.headers  # no content: none to name
    assert models.peek(checkpoint) is None
    assert not stored(api_settings, sessions, checkpoint)  # neither its row nor its file
    folder = api_settings.checkpoint_dir
    assert not [p for p in folder.iterdir() if trained in p.name] if folder.exists() else True
    for path in (f"/jobs/{trained}", f"/jobs/{trained}/metrics", f"/models/{trained}"):
        assert client.get(path).status_code == 404, path
    refused = client.post(predict, files={"file": ("d.png", digit())})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    # Predict with no choice falls back to a model that exists: none left.
    assert client.post("/predict", files={"file": ("d.png", digit())}).status_code == 409
    assert client.delete(f"/jobs/{trained}").status_code == 404


def test_queued_running_and_aliased_jobs_are_refused_with_what_to_do(
    client: TestClient, trained: str
) -> None:
    queued = client.post("/jobs", json={}).json()["id"]
    refused = client.delete(f"/jobs/{queued}")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "conflict"
    assert "cancel it first" in refused.json()["error"]["message"]
    assert client.post(f"/jobs/{queued}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/jobs/{queued}").status_code == 204

    client.put("/models/aliases/production", json={"job_id": trained})
    refused = client.delete(f"/jobs/{trained}")
    assert refused.status_code == 409
    assert "'production'" in refused.json()["error"]["message"]
    assert refused.json()["error"]["details"] == [{"aliases": ["production"]}]
    unaliased = client.delete("/models/aliases/production")
    assert unaliased.status_code == 204 and "content-type" not in unaliased.headers
    assert client.delete(f"/jobs/{trained}").status_code == 204


def test_unknown_and_malformed_ids(client: TestClient) -> None:
    assert client.delete(f"/jobs/{'0' * 32}").status_code == 404
    assert client.delete("/jobs/not-an-id").status_code == 422


def test_a_job_over_the_steps_budget_is_refused_naming_the_cap_and_its_steps(
    client: TestClient, api_settings: Settings
) -> None:
    # The largest job the fields allow: 100 epochs of 60,000 images one at a time.
    body = {"epochs": 100, "batch_size": 1, "trainset_size": 60000}
    refused = client.post("/jobs", json=body)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "invalid_input"
    assert "6000000 training steps" in error["message"]
    assert "1000000" in error["message"] and "MNIST_MAX_JOB_STEPS" in error["message"]
    assert error["details"][0]["steps"] == 6_000_000
    assert error["details"][0]["max_steps"] == 1_000_000
    assert client.get("/jobs").json()["jobs"] == []


def test_the_steps_budget_is_a_setting_and_a_job_at_it_fits(
    api_settings: Settings, tmp_path: Path
) -> None:
    # ceil(1000 / 64) = 16 steps an epoch.
    settings = api_settings.model_copy(update={"max_job_steps": 48})
    with TestClient(create_app(settings)) as client:
        fits = {"epochs": 3, "batch_size": 64, "trainset_size": 1000}
        assert client.post("/jobs", json=fits).json()["total_steps"] == 48
        over = client.post("/jobs", json={**fits, "epochs": 4})
        assert over.status_code == 422
        assert "64 training steps" in over.json()["error"]["message"]
