"""/sweeps through the app (real migrated database, real workers): start, read, list, cancel,
delete, promote; bad input named in the error envelope; the queue cap counts trials."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.settings import Settings
from service.store.tables import Job
from tests.support import SMALL_TEST, SMALL_TRAIN, stored
from workers.worker import Worker

TINY = {"epochs": 1, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "batch_size": 64}


def start(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/sweeps", json=body)
    assert response.status_code == 202, response.text
    sweep: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/sweeps/{sweep['id']}"
    return sweep


def test_a_sweep_trains_its_trials_as_jobs_and_promotes_the_best(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    body = {"params": TINY, "grid": {"learning_rate": [0.001, 0.01], "seed": [1]}}
    sweep = start(client, {**body, "promote": "production"})
    assert sweep["status"] == "running" and sweep["grid"] == body["grid"]
    assert [t["params"]["learning_rate"] for t in sweep["trials"]] == [0.001, 0.01]
    for trial in sweep["trials"]:
        job = client.get(f"/jobs/{trial['job_id']}").json()
        assert job["sweep_id"] == sweep["id"] and job["status"] == "queued"

    Worker(api_settings, sessions, show_progress=False).run(max_jobs=2)

    done = client.get(f"/sweeps/{sweep['id']}").json()
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    assert {t["status"] for t in done["trials"]} == {"succeeded"}
    accuracies = {t["job_id"]: t["accuracy"] for t in done["trials"]}
    best = max(accuracies.values())
    earliest = next(j for j, a in accuracies.items() if a == best)
    assert done["best"] == {"job_id": earliest, "accuracy": best}
    alias = client.get("/models/aliases/production").json()
    assert alias["job_id"] == earliest
    # An ordinary job is in no sweep.
    alone = client.post("/jobs", json=TINY).json()
    assert client.get(f"/jobs/{alone['id']}").json()["sweep_id"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"grid": {}}, "grid"),
        ({"grid": {"learning_rate": []}}, "grid.learning_rate"),
        ({"grid": {"learnin_rate": [0.1]}}, "grid.learnin_rate"),
        ({"grid": {"learning_rate": [0.1, 5]}}, "grid.learning_rate[1]"),
        ({"random": {"trials": 2, "space": {}}}, "random.space"),
        (
            {"random": {"trials": 2, "space": {"batch_size": {"choice": [64, 0]}}}},
            "random.space.batch_size.choice[1]",
        ),
        ({"grid": {"seed": list(range(300))}}, "grid"),
        ({"grid": {"seed": [1]}, "params": {"epochs": 0}}, "params.epochs"),
        ({"grid": {"seed": [1]}, "promote": "a b"}, "promote"),
        # Strings and booleans are no numbers, as in a job's fields (they were converted).
        ({"random": {"trials": "2", "space": {"seed": {"int_uniform": [1, 2]}}}}, "trials"),
        ({"random": {"trials": 2, "seed": True, "space": {"seed": {"choice": [1]}}}}, "seed"),
        (
            {"random": {"trials": 2, "space": {"learning_rate": {"uniform": ["0.001", 0.002]}}}},
            "random.space.learning_rate.uniform.0",
        ),
        (
            {"random": {"trials": 2, "space": {"learning_rate": {"log_uniform": [True, True]}}}},
            "random.space.learning_rate.log_uniform.0",
        ),
        (
            {"random": {"trials": 2, "space": {"epochs": {"int_uniform": [1, True]}}}},
            "random.space.epochs.int_uniform.1",
        ),
        (
            {"grid": {"epochs": [1, 100]}, "params": {"trainset_size": 60_000, "batch_size": 1}},
            "grid: trial 1",
        ),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post("/sweeps", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]
    assert client.get("/jobs").json()["jobs"] == []


def test_the_queue_cap_counts_trials(api_settings: Settings) -> None:
    settings = api_settings.model_copy(update={"max_queued_jobs": 5})
    with TestClient(create_app(settings)) as client:
        start(client, {"grid": {"seed": [1, 2, 3]}})
        refused = client.post("/sweeps", json={"grid": {"seed": [4, 5, 6]}})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert refused.json()["error"]["code"] == "too_many_requests"
        assert client.post("/sweeps", json={"grid": {"seed": [4, 5]}}).status_code == 202
        assert client.post("/jobs", json={}).status_code == 429  # the same cap


def test_sweeps_are_paged_newest_first(client: TestClient) -> None:
    made = [start(client, {"grid": {"seed": [i]}})["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/sweeps", params=query).json()
        seen += [s["id"] for s in page["sweeps"]]
        assert all(s["trials_by_status"]["queued"] == 1 for s in page["sweeps"])
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == made[::-1]
    assert client.get("/sweeps", params={"status": "succeeded"}).json()["sweeps"] == []
    assert client.get("/sweeps", params={"cursor": "nope"}).status_code == 422


def test_a_trial_goes_only_with_its_sweep(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    """Deleting a trial alone rewrote its sweep's record: a running grid whose succeeded trial
    was deleted ended ``failed``, its best gone. ``DELETE /jobs/{trial}`` is 409 whatever the
    trial's state, naming the sweep; the sweep's own delete takes its trials."""
    sweep = start(client, {"params": TINY, "grid": {"seed": [1, 2]}})
    Worker(api_settings, sessions, show_progress=False).run(max_jobs=1)  # one trial ends
    trials = [t["job_id"] for t in sweep["trials"]]
    for trial in trials:  # one succeeded, one queued
        refused = client.delete(f"/jobs/{trial}")
        assert refused.status_code == 409, refused.text
        assert f"DELETE /sweeps/{sweep['id']}" in refused.json()["error"]["message"]
    assert client.post(f"/sweeps/{sweep['id']}/cancel").status_code == 200
    assert client.delete(f"/jobs/{trials[0]}").status_code == 409  # the sweep has ended
    read = client.get(f"/sweeps/{sweep['id']}").json()
    assert [t["job_id"] for t in read["trials"]] == trials and read["best"] is not None
    assert client.delete(f"/sweeps/{sweep['id']}").status_code == 204
    assert [client.get(f"/jobs/{trial}").status_code for trial in trials] == [404, 404]


def test_cancel_then_delete(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    trained = start(client, {"params": TINY, "grid": {"seed": [1]}})
    Worker(api_settings, sessions, show_progress=False).run(max_jobs=1)
    with sessions() as session:
        job = session.get(Job, trained["trials"][0]["job_id"])
        assert job is not None and job.checkpoint is not None
        checkpoint = job.checkpoint
    assert stored(api_settings, sessions, checkpoint)

    sweep = start(client, {"grid": {"seed": [1, 2]}})
    refused = client.delete(f"/sweeps/{sweep['id']}")
    assert refused.status_code == 409 and "cancel it first" in refused.json()["error"]["message"]
    cancelled = client.post(f"/sweeps/{sweep['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/sweeps/{sweep['id']}/cancel").status_code == 409
    deleted = client.delete(f"/sweeps/{sweep['id']}")
    assert deleted.status_code == 204 and "content-type" not in deleted.headers
    assert client.get(f"/sweeps/{sweep['id']}").status_code == 404
    for trial in sweep["trials"]:
        assert client.get(f"/jobs/{trial['job_id']}").status_code == 404

    client.put("/models/aliases/keep", json={"job_id": trained["trials"][0]["job_id"]})
    aliased = client.delete(f"/sweeps/{trained['id']}")
    assert aliased.status_code == 409 and "'keep'" in aliased.json()["error"]["message"]
    client.delete("/models/aliases/keep")
    assert client.delete(f"/sweeps/{trained['id']}").status_code == 204
    assert not stored(api_settings, sessions, checkpoint)
    assert client.delete(f"/sweeps/{trained['id']}").status_code == 404
    assert client.post(f"/sweeps/{trained['id']}/cancel").status_code == 404
