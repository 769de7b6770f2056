"""The models API: versions, their weights, aliases, and the model that answers predict."""

from __future__ import annotations

import io

import anyio.to_thread
import numpy as np
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.ml import SimpleMLP
from service.settings import Settings
from service.store.artifacts import repo as artifacts_repo
from tests.jobs import read_job
from tests.service.api.routes.conftest import train_job
from tests.service.images import png
from tests.support import BOTH_STORES, synthetic_digits, together

MISSING = "0123456789abcdef0123456789abcdef"


def answered_by(client: TestClient, query: str = "") -> str:
    digit = png(synthetic_digits(1, seed=11)[0][0])
    response = client.post(f"/predict{query}", files={"file": ("d.png", digit, "image/png")})
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def test_models_are_listed_newest_first_and_paged(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    assert client.get("/models").json() == {"models": [], "next": None}
    first = train_job(client, sessions, api_settings)
    second = train_job(client, sessions, api_settings)
    client.post("/jobs", json={})  # queued: not a model

    listed = client.get("/models").json()
    assert [m["job_id"] for m in listed["models"]] == [second, first] and listed["next"] is None
    model = listed["models"][0]
    weights = client.get(f"/models/{second}/checkpoint").content
    assert model["checkpoint_bytes"] == len(weights) > 0
    assert model["params"]["seed"] == 3 and model["params"]["epochs"] == 2
    assert 0 < model["accuracy"] <= 1 and model["finished_at"] and model["aliases"] == []
    assert client.get(f"/models/{second}").json() == model

    page = client.get("/models", params={"limit": 1}).json()
    assert [m["job_id"] for m in page["models"]] == [second]
    rest = client.get("/models", params={"limit": 1, "cursor": page["next"]}).json()
    assert [m["job_id"] for m in rest["models"]] == [first] and rest["next"] is None
    assert client.get("/models", params={"cursor": "nonsense"}).status_code == 422
    assert client.get("/models", params={"limit": 0}).status_code == 422


def test_a_job_that_is_not_a_model_is_404(client: TestClient) -> None:
    queued = client.post("/jobs", json={}).json()["id"]
    response = client.get(f"/models/{queued}")
    assert response.status_code == 404
    assert "has no trained model" in response.json()["error"]["message"]
    assert client.get(f"/models/{MISSING}").status_code == 404
    assert client.get(f"/models/{queued}/checkpoint").status_code == 404
    assert client.get("/models/not-an-id").status_code == 422


@BOTH_STORES
def test_the_checkpoint_downloads_as_loadable_weights(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    job_id = train_job(client, sessions, api_settings)
    response = client.get(f"/models/{job_id}/checkpoint")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{job_id}.pt"' in response.headers["content-disposition"]
    model = SimpleMLP()
    model.load_state_dict(torch.load(io.BytesIO(response.content), weights_only=True))
    job = read_job(sessions, job_id)
    assert job.checkpoint == (
        f"{job_id}-1.pt" if api_settings.artifacts == "folder" else f"db:{job_id}-1.pt"
    )

    with sessions.begin() as session:  # the weights go missing from where they were
        artifacts_repo.drop(session, job_id)
    (api_settings.checkpoint_dir / f"{job_id}-1.pt").unlink(missing_ok=True)
    gone = client.get(f"/models/{job_id}/checkpoint")
    assert gone.status_code == 409
    assert (
        gone.json()["error"]["message"] == "the checkpoint of this model is missing or unreadable"
    )
    assert client.get(f"/models/{job_id}").json()["checkpoint_bytes"] is None


@BOTH_STORES
def test_a_damaged_checkpoint_is_409_and_never_sent(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    job_id = train_job(client, sessions, api_settings)
    name = f"{job_id}-1.pt"
    if api_settings.artifacts == "folder":
        path = api_settings.checkpoint_dir / name
        path.write_bytes(path.read_bytes()[:1000])  # cut short on the disk
    else:
        with sessions.begin() as session:  # or in its row
            data = artifacts_repo.data(session, name)
            assert data is not None
            artifacts_repo.drop(session, job_id)
            blob = artifacts_repo.Blob(
                job_id, name, artifacts_repo.CHECKPOINT, 1, None, data[:1000]
            )
            artifacts_repo.put(session, blob, now=utcnow())
    damaged = client.get(f"/models/{job_id}/checkpoint")
    assert damaged.status_code == 409
    assert damaged.json()["error"]["message"] == (
        "the checkpoint of this model is missing or unreadable"
    )


def test_the_checkpoint_answers_head_and_is_sent_whole_whatever_range_is_asked(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    job_id = train_job(client, sessions, api_settings)
    url = f"/models/{job_id}/checkpoint"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "none"
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(whole.content))
    assert head.headers["content-disposition"] == whole.headers["content-disposition"]
    assert client.head(f"/models/{MISSING}/checkpoint").status_code == 404
    # Any Range (valid, reversed, past the end, another unit) is ignored, as HTTP allows.
    for asked in ("bytes=0-9", "bytes=5-2", "bytes=99999999-", "items=0-5"):
        ranged = client.get(url, headers={"Range": asked})
        assert ranged.status_code == 200 and ranged.content == whole.content, asked


@BOTH_STORES
def test_a_crowd_of_downloads_never_waits_on_the_session_pool(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    # Two threads for the app, and more downloads at once than its read sessions' pool holds
    # (15): downloads that held their session while a thread streamed the file stalled for the
    # pool's 30 s timeout and then answered 503.
    job_id = train_job(client, sessions, api_settings)
    portal = client.portal
    assert portal is not None  # the client is open
    limiter = portal.call(anyio.to_thread.current_default_thread_limiter)
    tokens = limiter.total_tokens
    portal.call(setattr, limiter, "total_tokens", 2)
    try:
        answers = together([lambda: client.get(f"/models/{job_id}/checkpoint")] * 24)
        assert [a.status_code for a in answers] == [200] * 24  # no 503 from the pool's timeout
    finally:
        portal.call(setattr, limiter, "total_tokens", tokens)


def test_aliases_choose_the_model_and_deleting_production_falls_back(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    older = train_job(client, sessions, api_settings)
    newer = train_job(client, sessions, api_settings)
    assert answered_by(client) == newer  # no alias: the newest model

    put = client.put("/models/aliases/production", json={"job_id": older})
    assert put.status_code == 200
    assert put.json()["name"] == "production" and put.json()["job_id"] == older
    assert answered_by(client) == older  # production wins over the newest
    assert answered_by(client, f"?job_id={newer}") == newer  # an explicit version wins
    assert answered_by(client, "?model=production") == older

    assert client.put("/models/aliases/canary", json={"job_id": newer}).status_code == 200
    assert answered_by(client, "?model=canary") == newer
    assert answered_by(client, f"?model=canary&job_id={newer}") == newer  # both, agreeing
    disagree = client.post(
        f"/predict?model=canary&job_id={older}",
        files={"file": ("d.png", png(np.zeros((28, 28), np.uint8)))},
    )
    assert disagree.status_code == 409
    assert f"points at job {newer}, not at {older}" in disagree.json()["error"]["message"]
    assert client.get("/models/aliases/canary").json()["job_id"] == newer
    names = [a["name"] for a in client.get("/models/aliases").json()["aliases"]]
    assert names == ["canary", "production"]
    assert client.get(f"/models/{older}").json()["aliases"] == ["production"]

    moved = client.put("/models/aliases/production", json={"job_id": newer})
    assert moved.json()["job_id"] == newer and answered_by(client) == newer
    client.put("/models/aliases/production", json={"job_id": older})

    assert client.delete("/models/aliases/production").status_code == 204
    assert answered_by(client) == newer  # back to the newest model
    assert client.delete("/models/aliases/production").status_code == 404
    unknown = client.post(
        "/predict?model=production", files={"file": ("d.png", png(np.zeros((28, 28), np.uint8)))}
    )
    assert unknown.status_code == 404
    assert "no model alias named 'production'" in unknown.json()["error"]["message"]


def test_alias_writes_are_validated(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    model = train_job(client, sessions, api_settings)
    queued = client.post("/jobs", json={}).json()["id"]
    not_trained = client.put("/models/aliases/production", json={"job_id": queued})
    assert not_trained.status_code == 409
    assert "has no trained model" in not_trained.json()["error"]["message"]
    assert client.put("/models/aliases/production", json={"job_id": MISSING}).status_code == 404
    for body in ({}, {"job_id": "nope"}, {"job_id": model, "extra": 1}, {"job_id": 5}):
        assert client.put("/models/aliases/production", json=body).status_code == 422, body
    for name in ("-leading-dash", "x" * 65, "sp ace"):
        assert client.put(f"/models/aliases/{name}", json={"job_id": model}).status_code == 422
    assert client.get("/models/aliases/nothing").status_code == 404
    assert client.get("/models/aliases").json() == {"aliases": []}
