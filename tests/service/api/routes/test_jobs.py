"""The jobs API: validation, the job document, paging, metrics, cancel."""

from __future__ import annotations

import csv
import io
import logging
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import anyio
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import Message, Scope

from service.api.routes import jobs as jobs_routes
from service.clock import utcnow
from service.domain import jobs as jobs_domain
from service.schemas import MetricsRead
from service.status import JobStatus
from service.store import queue_repo, worker_repo
from service.store.packs import claim_more
from service.store.tables import Job
from tests.records import PARAMS, FakeTraining, lapse_leases
from tests.service.api.routes.conftest import BOTH_WAYS

DEFAULTS = {
    "epochs": 3,
    "batch_size": 64,
    "learning_rate": 0.001,
    "trainset_size": 10000,
    "testset_size": 1000,
    "seed": None,
    "max_runtime_s": None,
}
RAW_PNG = {"content-type": "image/png"}


def test_submit_fills_in_defaults_and_points_to_the_job(client: TestClient) -> None:
    response = client.post("/jobs", json={})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["params"] == DEFAULTS
    assert job["status"] == "queued"
    assert (job["epoch"], job["step"], job["total_steps"]) == (0, 0, 471)
    for key in ("started_at", "finished_at", "accuracy", "device", "error"):
        assert job[key] is None
    assert job["created_at"].endswith("Z") or job["created_at"].endswith("+00:00")
    assert client.get(response.headers["location"]).json() == job


def test_a_request_without_a_body_means_defaults(client: TestClient) -> None:
    response = client.post("/jobs")
    assert response.status_code == 202
    assert response.json()["params"] == DEFAULTS


def test_given_fields_are_kept(client: TestClient) -> None:
    body = {"epochs": 1, "batch_size": 128, "learning_rate": 0.5, "seed": 0, "testset_size": 10}
    job = client.post("/jobs", json=body).json()
    assert job["params"] == {**DEFAULTS, **body}
    assert job["total_steps"] == 79


BAD_PAYLOADS: list[tuple[str, Any, str]] = [
    ("epochs zero", {"epochs": 0}, "epochs"),
    ("epochs too many", {"epochs": 101}, "epochs"),
    ("epochs fractional", {"epochs": 2.5}, "epochs"),
    ("epochs as text", {"epochs": "3"}, "epochs"),
    ("epochs as bool", {"epochs": True}, "epochs"),
    ("epochs null", {"epochs": None}, "epochs"),
    ("batch_size zero", {"batch_size": 0}, "batch_size"),
    ("batch_size too big", {"batch_size": 4097}, "batch_size"),
    ("learning_rate zero", {"learning_rate": 0}, "learning_rate"),
    ("learning_rate negative", {"learning_rate": -0.1}, "learning_rate"),
    ("learning_rate above one", {"learning_rate": 1.5}, "learning_rate"),
    ("learning_rate as text", {"learning_rate": "fast"}, "learning_rate"),
    ("trainset_size zero", {"trainset_size": 0}, "trainset_size"),
    ("trainset_size too big", {"trainset_size": 60001}, "trainset_size"),
    ("testset_size too big", {"testset_size": 10001}, "testset_size"),
    ("seed negative", {"seed": -1}, "seed"),
    ("seed too big", {"seed": 2**63}, "seed"),
    ("seed as float", {"seed": 1.5}, "seed"),
    ("unknown field", {"lr": 0.1}, "lr"),
    ("body a list", [1, 2], "body"),
]


@pytest.mark.parametrize(
    ("payload", "field"),
    [(p, f) for _, p, f in BAD_PAYLOADS],
    ids=[name for name, _, _ in BAD_PAYLOADS],
)
def test_bad_payloads_get_422_naming_the_field(
    client: TestClient, payload: Any, field: str
) -> None:
    response = client.post("/jobs", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["message"]
    assert any(field in map(str, d["loc"]) for d in error["details"])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client: TestClient, literal: str) -> None:
    response = client.post(
        "/jobs",
        content=f'{{"learning_rate": {literal}}}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert "learning_rate" in response.json()["error"]["message"]


def test_malformed_json_is_a_422_not_a_crash(client: TestClient) -> None:
    response = client.post(
        "/jobs", content=b'{"epochs": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


@BOTH_WAYS
def test_unknown_and_malformed_ids(client: TestClient) -> None:
    missing = client.get("/jobs/0123456789abcdef0123456789abcdef")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    malformed = client.get("/jobs/../../etc/passwd")
    assert malformed.status_code in (404, 422)
    assert client.get("/jobs/XYZ").status_code == 422
    assert client.get("/jobs/0123456789abcdef0123456789abcdef/metrics").status_code == 404


def test_list_is_newest_first_and_paginated(client: TestClient) -> None:
    ids = [client.post("/jobs", json={"epochs": 1}).json()["id"] for _ in range(5)]
    seen: list[str] = []
    url = "/jobs?limit=2"
    while True:
        page = client.get(url).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        if page["next"] is None:
            break
        url = f"/jobs?limit=2&cursor={page['next']}"
    assert seen == ids[::-1]
    assert client.get("/jobs?status=queued").json()["jobs"][0]["id"] == ids[-1]
    assert client.get("/jobs?status=succeeded").json() == {"jobs": [], "next": None}
    assert client.get("/jobs?status=bogus").status_code == 422
    assert client.get("/jobs?limit=0").status_code == 422
    assert client.get("/jobs?limit=101").status_code == 422
    assert client.get("/jobs?cursor=garbage!").status_code == 422


def _record_steps(sessions: sessionmaker[Session], job_id: str, count: int) -> None:
    with sessions.begin() as session:
        job = queue_repo.claim_job(session, worker_id="w", lease_s=30, device="cpu", now=utcnow())
        assert job is not None and job.id == job_id
        rows = [
            {"step": s, "epoch": 1, "loss": 2.0 / s, "examples_seen": 64 * s}
            for s in range(1, count + 1)
        ]
        queue_repo.record_progress(
            session,
            job_id=job_id,
            attempt=1,
            worker_id="w",
            progress=queue_repo.Progress(
                steps=rows,
                epochs=[{"epoch": 1, "accuracy": 0.5, "examples_seen": 64 * count}],
                step=count,
                epoch=1,
                accuracy=0.5,
            ),
            lease_s=30,
            now=utcnow(),
        )


@BOTH_WAYS
def test_metrics_page_by_after_step(client: TestClient, sessions: sessionmaker[Session]) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    empty = client.get(f"/jobs/{job_id}/metrics").json()
    assert empty == {
        "job_id": job_id,
        "status": "queued",
        "attempt": 0,
        "steps": [],
        "epochs": [],
        "next_after_step": 0,
    }
    _record_steps(sessions, job_id, 25)
    seen: list[int] = []
    after = 0
    while True:
        page = client.get(f"/jobs/{job_id}/metrics?after_step={after}&limit=10").json()
        if not page["steps"]:
            break
        seen += [s["step"] for s in page["steps"]]
        after = page["next_after_step"]
    assert seen == list(range(1, 26))
    assert page["next_after_step"] == 25
    assert page["epochs"] == [{"epoch": 1, "accuracy": 0.5, "examples_seen": 1600}]
    assert page["status"] == "running"
    first = client.get(f"/jobs/{job_id}/metrics?limit=1").json()["steps"][0]
    assert first == {"step": 1, "epoch": 1, "loss": 2.0, "examples_seen": 64}
    too_many = jobs_routes.MAX_STEPS_PAGE + 1
    assert client.get(f"/jobs/{job_id}/metrics?limit={too_many}").status_code == 422
    assert client.get(f"/jobs/{job_id}/metrics?after_step=-1").status_code == 422
    # Past the steps column's range: no step has such a number, and SQLite could not compare.
    past = client.get(f"/jobs/{job_id}/metrics?after_step={jobs_routes.MAX_STEP + 1}")
    assert past.status_code == 422
    assert "after_step" in past.json()["error"]["message"]
    last = client.get(f"/jobs/{job_id}/metrics?after_step={jobs_routes.MAX_STEP}").json()
    assert last["steps"] == [] and last["next_after_step"] == jobs_routes.MAX_STEP


@BOTH_WAYS
def test_a_metrics_page_names_the_run_its_steps_are_of(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    """A poller paging with after_step spliced a retry's new run onto the lost one's steps,
    with nothing in the answer to tell it (a review: every step polled before a kill held the
    lost run's losses); the attempt tells it to read again from 0."""
    training = FakeTraining(sessions, PARAMS)
    job_id = training.submit()
    training.claim()
    training.advance(3)
    page = client.get(f"/jobs/{job_id}/metrics?after_step=0").json()
    assert (page["attempt"], page["next_after_step"]) == (1, 3)
    lapse_leases(sessions)  # its worker died; another runs the job again from its first step
    training.worker_id = "second"
    training.claim()
    training.advance(2)
    later = client.get(f"/jobs/{job_id}/metrics?after_step=3").json()
    assert (later["attempt"], later["steps"]) == (2, [])  # nothing new after 3: but a new run
    again = client.get(f"/jobs/{job_id}/metrics?after_step=0").json()
    assert [s["step"] for s in again["steps"]] == [1, 2] and again["attempt"] == 2


@BOTH_WAYS
def test_metrics_as_csv_hold_every_step_and_the_epochs_accuracy(
    client: TestClient, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    empty = client.get(f"/jobs/{job_id}/metrics.csv")
    assert empty.status_code == 200
    assert empty.text == "step,epoch,examples_seen,loss,test_accuracy\n"
    _record_steps(sessions, job_id, 25)
    monkeypatch.setattr(jobs_domain, "CSV_READ_STEPS", 10)  # read in pages: none lost or repeated
    response = client.get(f"/jobs/{job_id}/metrics.csv")
    assert response.headers["content-type"].startswith("text/csv")
    assert f'filename="{job_id}-metrics.csv"' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 26))
    assert [float(r["loss"]) for r in rows] == [2.0 / s for s in range(1, 26)]  # exact
    assert [r["test_accuracy"] for r in rows] == [""] * 24 + ["0.5"]
    assert client.get(f"/jobs/{'0' * 32}/metrics.csv").status_code == 404


@BOTH_WAYS
@pytest.mark.parametrize("after_step", [2**31, 10**17, 2**63], ids=["2**31", "10**17", "2**63"])
def test_after_step_beyond_the_steps_column_is_422_naming_it(
    client: TestClient, sessions: sessionmaker[Session], after_step: int
) -> None:
    # 2**31 overflows PostgreSQL's integer column, 2**63 SQLite's: either once reached a query.
    job_id = client.post("/jobs", json={}).json()["id"]
    _record_steps(sessions, job_id, 3)
    response = client.get(f"/jobs/{job_id}/metrics?after_step={after_step}")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"].startswith("query.after_step:")
    assert [d["loc"] for d in error["details"]] == [["query", "after_step"]]
    assert client.get(f"/jobs/{job_id}/metrics?limit={after_step}").status_code == 422


def test_every_cursor_and_limit_the_lists_take_is_answered(client: TestClient) -> None:
    # The largest cursor the pattern admits (16 digits of microseconds: the year 2286) and the
    # smallest name positions on every backend; larger numbers are refused by the pattern.
    for url in ("/jobs", "/models"):
        for cursor in ("9" * 16 + "-" + "f" * 32, "0" * 16 + "-" + "0" * 32):
            response = client.get(url, params={"cursor": cursor})
            assert response.status_code == 200, (url, cursor, response.text)
        too_far = client.get(url, params={"cursor": "9" * 17 + "-" + "f" * 32})
        assert too_far.status_code == 422 and "cursor" in too_far.json()["error"]["message"]
        assert client.get(url, params={"limit": 2**63}).status_code == 422


@BOTH_WAYS
def test_the_metrics_body_is_exactly_the_documented_schema(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    # The route serialises rows itself (orjson), bypassing response_model: hold it to it.
    job_id = client.post("/jobs", json={}).json()["id"]
    _record_steps(sessions, job_id, 3)
    response = client.get(f"/jobs/{job_id}/metrics")
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert MetricsRead.model_validate(body).model_dump(mode="json") == body
    assert [s["loss"] for s in body["steps"]] == [2.0, 1.0, 2.0 / 3]
    assert body["next_after_step"] == 3


def test_cancel(client: TestClient, sessions: sessionmaker[Session]) -> None:
    queued = client.post("/jobs", json={}).json()["id"]
    response = client.post(f"/jobs/{queued}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    again = client.post(f"/jobs/{queued}/cancel")
    assert again.status_code == 409
    assert "already ended" in again.json()["error"]["message"]

    running = client.post("/jobs", json={}).json()["id"]
    _record_steps(sessions, running, 1)
    assert client.post(f"/jobs/{running}/cancel").json()["status"] == "running"
    with sessions() as session:
        job = session.get(Job, running)
        assert job is not None and job.cancel_requested
    assert client.post("/jobs/0123456789abcdef0123456789abcdef/cancel").status_code == 404


def test_health_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    schema = client.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/metrics", "/predict"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200
    assert client.get("/no-such-route").json()["error"]["code"] == "http_404"


def register_workers(
    sessions: sessionmaker[Session], names: tuple[str, ...], now: datetime
) -> None:
    """Workers of these names on CPU, just started."""
    with sessions.begin() as session:
        for name in names:
            worker_repo.register_worker(
                session, worker_id=name, host="h", pid=1, device="cpu", now=now
            )


def test_workers_lists_live_workers_and_their_jobs(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    assert client.get("/workers").json() == {"workers": []}
    job_id = client.post("/jobs", json={}).json()["id"]
    now = utcnow()
    register_workers(sessions, ("busy", "gone"), now)
    with sessions.begin() as session:
        worker_repo.worker_stopped(session, worker_id="gone", now=now)
    with sessions.begin() as session:
        assert queue_repo.claim_job(session, worker_id="busy", lease_s=30, device="cpu", now=now)
    workers = client.get("/workers").json()["workers"]
    assert [(w["id"], w["job_id"], w["device"]) for w in workers] == [("busy", job_id, "cpu")]
    assert workers[0]["job_ids"] == [job_id]
    job = client.get(f"/jobs/{job_id}").json()
    assert (job["worker"], job["attempt"]) == ("busy", 1)
    assert job["heartbeat_at"] is not None


def test_a_packing_worker_is_shown_with_every_job_it_holds(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    ids = [client.post("/jobs", json={"seed": s}).json()["id"] for s in range(3)]
    now = utcnow()
    register_workers(sessions, ("packer",), now)
    with sessions.begin() as session:
        first = queue_repo.claim_job(session, worker_id="packer", lease_s=30, device="cpu", now=now)
        assert first is not None
        more = claim_more(
            session,
            first=first,
            fields=("epochs", "batch_size"),
            limit=2,
            worker_id="packer",
            lease_s=30,
            device="cpu",
            now=now,
        )
        assert len(more) == 2
    (worker,) = client.get("/workers").json()["workers"]
    assert (worker["job_id"], sorted(worker["job_ids"])) == (ids[0], sorted(ids))
    with sessions.begin() as session:  # the pack's first job ends; the others still train
        queue_repo.finish_job(
            session,
            job_id=ids[0],
            attempt=1,
            worker_id="packer",
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
        )
    (worker,) = client.get("/workers").json()["workers"]
    assert sorted(worker["job_ids"]) == sorted(ids[1:]) and worker["job_id"] in ids[1:]


def test_workers_shows_no_job_for_a_worker_whose_lease_was_taken(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    now = utcnow()
    register_workers(sessions, ("fenced", "thief"), now)
    with sessions.begin() as session:
        assert queue_repo.claim_job(session, worker_id="fenced", lease_s=30, device="cpu", now=now)
        worker_repo.worker_heartbeat(session, worker_id="fenced")  # alive, but silent
    lapse_leases(sessions)  # its lease ran out a second ago
    before = client.get("/workers").json()["workers"]
    assert [(w["id"], w["job_id"]) for w in before] == [("fenced", job_id), ("thief", None)]
    with sessions.begin() as session:
        assert queue_repo.claim_job(session, worker_id="thief", lease_s=30, device="cpu", now=now)
    workers = client.get("/workers").json()["workers"]
    assert [(w["id"], w["job_id"]) for w in workers] == [("fenced", None), ("thief", job_id)]
    assert [w["job_ids"] for w in workers] == [[], [job_id]]


@pytest.mark.parametrize("spelt", ["1_0", "+10", "%2B10", "10.0", "1e1", "%2010", "0x10"])
def test_a_query_integer_in_other_than_decimal_digits_is_a_422_naming_it(
    client: TestClient, spelt: str
) -> None:
    """Every integer of a query string, on every route (metrics, the listings, predict): the
    lax reading took "1_0" and "+10" as 10, a different string for the same answer."""
    job_id = client.post("/jobs", json={}).json()["id"]
    for path, name in [
        (f"/jobs/{job_id}/metrics", "after_step"),
        (f"/jobs/{job_id}/metrics", "limit"),
        ("/jobs", "limit"),
        ("/models", "limit"),
        ("/sweeps", "limit"),
    ]:
        response = client.get(f"{path}?{name}={spelt}")
        assert response.status_code == 422, (path, name)
        error = response.json()["error"]
        assert error["message"] == f"query.{name}: must be a whole number in decimal digits"
        assert client.get(f"{path}?{name}=010").status_code == 200  # leading zeros: still 10
    predict = client.post(f"/predict?top_k={spelt}", content=b"x", headers=RAW_PNG)
    assert predict.status_code == 422
    assert predict.json()["error"]["message"].startswith("query.top_k: must be a whole number")


def test_unknown_query_parameters_are_named_in_a_422(client: TestClient) -> None:
    response = client.get("/jobs?limt=5")
    assert response.status_code == 422
    assert "unknown query parameter 'limt'" in response.json()["error"]["message"]
    assert client.get("/jobs?limit=5").status_code == 200
    repeated = client.get("/jobs?limit=5&limit=50")
    assert repeated.status_code == 422
    assert "'limit' is given more than once" in repeated.json()["error"]["message"]


@pytest.mark.parametrize(
    "error",
    [psycopg.OperationalError("the server closed the connection"), sqlite3.InterfaceError()],
    ids=["postgresql", "sqlite"],
)
def test_a_driver_error_in_a_route_is_answered_and_raised_no_further(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    # Reads on the driver's own cursor raise its errors unwrapped. Judged by the server's last
    # layer, the answer was sent and the error raised on (the test client raises it): a real
    # server then reset the keep-alive connection the answer went out on.
    job_id = client.post("/jobs", json={}).json()["id"]

    def fails(*_args: object) -> str:
        raise error

    monkeypatch.setattr(jobs_domain, "metrics_csv", fails)
    answer = client.get(f"/jobs/{job_id}/metrics.csv")
    if isinstance(error, psycopg.OperationalError):  # the connection broke: an outage
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert answer.json()["error"]["code"] == "database_unavailable"
    else:
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"


def test_a_csv_download_cut_short_ends_unfinished(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its rest not to be had (the job deleted meanwhile, say): raised on, it was logged as a
    bug; ended as complete, its first rows would pass for the whole CSV."""
    job_id = client.post("/jobs", json={}).json()["id"]

    def cut_short(*_args: object) -> Iterator[str]:
        yield "step,epoch,examples_seen,loss,test_accuracy\n1,1,64,2.0,\n"
        raise jobs_domain.DownloadCutShort("job x was deleted or ran again meanwhile")

    monkeypatch.setattr(jobs_domain, "metrics_csv", cut_short)
    with caplog.at_level(logging.WARNING):
        answer = client.get(f"/jobs/{job_id}/metrics.csv")
    assert answer.status_code == 200  # (the test client passes an unfinished body on)
    assert "unhandled error" not in caplog.text
    assert "a CSV download cut short: job x was deleted or ran again meanwhile" in caplog.text


def test_a_stream_cut_short_sends_no_last_chunk() -> None:
    """What a server then closes without the body's end: the client sees it cut off."""

    def pieces() -> Iterator[str]:
        yield "a\n"
        raise jobs_domain.DownloadCutShort("gone")

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET"}
    response = jobs_routes._UnfinishedIfCutShort(pieces(), media_type="text/csv")
    anyio.run(response.__call__, scope, receive, send)
    assert [(m["type"], m.get("body"), m.get("more_body")) for m in sent] == [
        ("http.response.start", None, None),
        ("http.response.body", b"a\n", True),
    ]
