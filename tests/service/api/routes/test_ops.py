"""/readyz and /metrics: what they check, what they count."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.clock import utcnow
from service.schemas import JobCreate
from service.settings import Settings
from service.store import migrations, worker_repo
from service.store.tables import Job, ReadinessProbe, WorkerRow
from tests.records import LEASE_S, FakeTraining, lapse_leases
from tests.support import NEEDS_PROMTOOL, promtool_problems, wait_for


def add_worker(sessions: sessionmaker[Session], *, age_s: float, stopped: bool = False) -> None:
    now = utcnow()
    with sessions.begin() as session:
        session.add(
            WorkerRow(
                id=f"host:{age_s}:{stopped}",
                host="host",
                pid=1,
                device="cpu",
                started_at=now - timedelta(seconds=age_s + 60),
                heartbeat_at=now - timedelta(seconds=age_s),
                stopped_at=now if stopped else None,
            )
        )


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from the exposition text."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" (\S+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    assert match, f"no sample {name} {labels} in:\n{text}"
    return float(match.group(1))


def test_ready_when_the_database_is_migrated(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert {c["name"]: c["ok"] for c in body["checks"]} == {
        "database": True,
        "migrations": True,
        "workers": True,
        "writes": True,
        "storage": True,
    }
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readiness_logs_nothing_of_alembics(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Every /readyz wrote alembic's "Context impl SQLiteImpl." and "Will assume
    non-transactional DDL." to the log: reading the revision configured a MigrationContext."""
    with caplog.at_level("DEBUG"):
        assert client.get("/readyz").status_code == 200
    assert [r.getMessage() for r in caplog.records if r.name.startswith("alembic")] == []


def test_readiness_and_metrics_report_the_store_size_read_once(client: TestClient) -> None:
    checks = {c["name"]: c for c in client.get("/readyz").json()["checks"]}
    match = re.fullmatch(r"(\d+) bytes \((.+)\)", checks["storage"]["detail"])
    assert match, checks["storage"]
    size = int(match.group(1))
    assert size > 0
    client.post("/jobs", json={})  # the store grows; the figure is the cached one (30 s)
    assert sample(client.get("/metrics").text, "mnist_store_bytes") == size


def test_head_of_health_and_readiness_answers_without_a_body(
    client: TestClient, tmp_path: Path, api_settings: Settings
) -> None:
    for path in ("/healthz", "/readyz"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path
    broken = api_settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}"})
    with TestClient(create_app(broken)) as down:
        assert down.head("/healthz").status_code == 200
        response = down.head("/readyz")
    assert response.status_code == 503 and response.content == b""
    assert response.headers["retry-after"] == "2"


def read_only(engine: Engine) -> None:
    """Every new connection of ``engine`` refuses writes and still reads, as a read-only
    SQLite file, a PostgreSQL replica or ``default_transaction_read_only`` do."""
    statement = (
        "PRAGMA query_only = ON"
        if engine.dialect.name == "sqlite"
        else "SET default_transaction_read_only = on"
    )

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(statement)
        cursor.close()
        if engine.dialect.name != "sqlite":
            dbapi_connection.commit()

    event.listen(engine, "connect", on_connect)


def test_not_ready_while_writes_fail_though_reads_succeed(api_settings: Settings) -> None:
    settings = api_settings.model_copy(update={"ready_write_probe_s": 0.0})
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/jobs", json={}).json()["id"]
        engine = client.app.state.write_sessions.kw["bind"]  # type: ignore[attr-defined]
        engine.dispose()
        read_only(engine)
        response = client.get("/readyz")
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        error = response.json()["error"]
        assert error["code"] == "not_ready" and "writes: failing" in error["message"]
        checks = {d["name"]: d["ok"] for d in error["details"]}
        assert checks == {
            "database": True,
            "migrations": True,
            "workers": True,
            "storage": True,
            "writes": False,
        }
        # Reads go on; a write is refused as an outage, not as a bug.
        assert client.get(f"/jobs/{job_id}").status_code == 200
        refused = client.post("/jobs", json={})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "database_unavailable"


def test_the_write_probe_runs_at_most_once_per_interval(
    api_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    settings = api_settings.model_copy(update={"ready_write_probe_s": 3600.0})
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        with sessions() as session:
            first = session.scalars(select(ReadinessProbe.written_at)).one()
        for _ in range(5):
            assert client.get("/readyz").status_code == 200
        with sessions() as session:
            assert session.scalars(select(ReadinessProbe.written_at)).one() == first


def readyz_at(revision: str, sqlite_url: str, api_settings: Settings) -> dict[str, Any]:
    """The 503 error of ``/readyz`` of an app on ``sqlite_url`` downgraded to ``revision``."""
    config = migrations.alembic_config(sqlite_url)
    config.attributes["configure_logger"] = False
    command.downgrade(config, revision)
    settings = api_settings.model_copy(update={"database_url": sqlite_url})
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    error: dict[str, Any] = response.json()["error"]
    return error


def test_not_ready_when_the_schema_is_behind(sqlite_url: str, api_settings: Settings) -> None:
    error = readyz_at("0001", sqlite_url, api_settings)
    assert error["code"] == "not_ready"
    assert "database at 0001" in error["message"] and "mnist-service migrate" in error["message"]
    assert {d["name"]: d["ok"] for d in error["details"]}["migrations"] is False


def test_an_empty_database_is_not_ready_for_its_schema_alone(
    sqlite_url: str, api_settings: Settings
) -> None:
    """The workers' check read a table that is not there, and /readyz said the database was
    both reachable and unreachable."""
    error = readyz_at("base", sqlite_url, api_settings)
    checks = {d["name"]: (d["ok"], d["detail"]) for d in error["details"]}
    assert checks == {
        "database": (True, "reachable"),
        "migrations": (False, "the database has no schema yet: run `mnist-service migrate`"),
    }


def test_a_read_that_fails_after_the_ping_is_one_failed_database_check(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement cancelled after the ping (a statement_timeout, a lock not had) was
    reported as the database both "reachable" and "unreachable"."""

    def cancelled(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("SELECT ...", {}, sqlite3.OperationalError("interrupted"))

    monkeypatch.setattr(worker_repo, "live_workers", cancelled)
    with TestClient(create_app(api_settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = [(d["name"], d["ok"], d["detail"]) for d in response.json()["error"]["details"]]
    assert [c for c in checks if c[0] == "database"] == [
        ("database", False, "a read failed: OperationalError")
    ]


def test_not_ready_when_the_database_cannot_be_opened(
    tmp_path: Path, api_settings: Settings
) -> None:
    # A folder is no database file: SQLite cannot open it.
    settings = api_settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}"})
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["error"]["details"] == [
            {"name": "database", "ok": False, "detail": "unreachable: OperationalError"}
        ]
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert sample(metrics.text, "mnist_database_up") == 0


def test_a_live_worker_is_required_only_when_configured(
    api_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    settings = api_settings.model_copy(update={"ready_requires_worker": True})
    with TestClient(create_app(settings)) as client:
        add_worker(sessions, age_s=settings.lease_s + 5)  # too old
        add_worker(sessions, age_s=0, stopped=True)  # stopped
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "workers: 0 live" in response.json()["error"]["message"]
        add_worker(sessions, age_s=1)
        response = client.get("/readyz")
        assert response.status_code == 200
        workers = next(c for c in response.json()["checks"] if c["name"] == "workers")
        assert workers["detail"].startswith("1 live") and "required" in workers["detail"]


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    client.get(f"/jobs/{job_id}")
    client.get(f"/jobs/{job_id}")
    client.get("/jobs/" + "0" * 32)
    client.get("/no/such/path")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    requests = "mnist_http_requests_total"
    assert sample(text, requests, method="GET", route="/jobs/{job_id}", status="200") == 2
    assert sample(text, requests, method="GET", route="/jobs/{job_id}", status="404") == 1
    assert sample(text, requests, method="POST", route="/jobs", status="202") == 1
    assert sample(text, requests, method="GET", route="<unmatched>", status="404") == 1
    assert job_id not in text  # templates, never raw paths
    latency = "mnist_http_request_duration_seconds_count"
    assert sample(text, latency, method="GET", route="/jobs/{job_id}") == 3


def test_the_documentation_is_counted_under_its_own_routes_and_nothing_is_created(
    client: TestClient,
) -> None:
    for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    text = client.get("/metrics").text
    requests = "mnist_http_requests_total"
    assert sample(text, requests, method="GET", route="/openapi.json", status="200") == 2
    for path in ("/docs", "/docs/oauth2-redirect", "/redoc"):
        assert sample(text, requests, method="GET", route=path, status="200") == 1
    assert "<unmatched>" not in text
    # No ``_created`` series: a scrape holds what Prometheus needs, and nothing twice.
    assert "_created" not in text


@NEEDS_PROMTOOL
def test_a_scrape_passes_promtools_lint(client: TestClient) -> None:
    job_id = client.post("/jobs", json={}).json()["id"]
    for path in (f"/jobs/{job_id}", "/jobs", "/openapi.json", "/no/such/path", "/readyz"):
        client.get(path)
    client.request("BREW", "/jobs")
    scrape = client.get("/metrics").text
    assert "mnist_http_request_duration_seconds_bucket" in scrape  # there is something to lint
    assert promtool_problems(scrape) == ""


def test_metrics_count_unknown_methods_under_one_label(client: TestClient) -> None:
    for method in ("BREW", "PROPFIND", "X" * 40):
        client.request(method, "/jobs")
    client.request("DELETE", "/jobs")
    text = client.get("/metrics").text
    requests = "mnist_http_requests_total"
    assert sample(text, requests, method="other", route="/jobs", status="405") == 3
    assert sample(text, requests, method="DELETE", route="/jobs", status="405") == 1
    assert "BREW" not in text and "PROPFIND" not in text  # a client cannot grow the label set


def test_metrics_report_jobs_queue_workers_and_throughput(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    training = FakeTraining(sessions, JobCreate(epochs=2, batch_size=10, trainset_size=100))
    training.submit()
    training.claim()
    for _ in range(2):
        client.post("/jobs", json={})
    add_worker(sessions, age_s=1)
    training.advance(5, seconds=1.0)  # 50 images in the second since the claim
    first = client.get("/metrics").text
    assert sample(first, "mnist_jobs", status="queued") == 2
    assert sample(first, "mnist_jobs", status="running") == 1
    assert sample(first, "mnist_jobs", status="succeeded") == 0
    assert sample(first, "mnist_queue_depth") == 2
    assert sample(first, "mnist_workers_live") == 1
    assert sample(first, "mnist_database_up") == 1
    assert sample(first, "mnist_training_images_per_second") == pytest.approx(50.0)

    training.advance(5, seconds=0.25)  # 50 more images in a quarter second
    second = client.get("/metrics").text
    assert sample(second, "mnist_training_images_per_second") == pytest.approx(200.0)
    training.finish()
    third = client.get("/metrics").text
    assert sample(third, "mnist_training_images_per_second") == 0
    assert sample(third, "mnist_jobs", status="succeeded") == 1


def test_a_resumed_attempt_is_rated_from_its_next_scrape_not_from_its_start(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    """The retried attempt's newest step counts the first attempt's epoch too: rated from its
    own start, 0.5 s before, that came out a hundred times the true rate."""
    params = JobCreate(epochs=2, batch_size=10, trainset_size=100)
    training = FakeTraining(sessions, params, clock=utcnow() - timedelta(seconds=LEASE_S + 5))
    training.submit()
    training.claim()
    training.run_epoch(0.5)  # 100 images and a training state to resume from ...
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == training.job_id)
            .values(resume_epoch=1, resume_checkpoint="s")
        )
    # ... then the worker dies
    lapse_leases(sessions)
    training.claim()  # attempt 2 resumes after epoch 1, its steps kept
    training.step, training.epoch = training.steps_per_epoch, 1
    training.advance(1, seconds=0.5)
    first = client.get("/metrics").text
    assert sample(first, "mnist_jobs", status="running") == 1
    assert sample(first, "mnist_training_images_per_second") == 0  # rated from here on
    training.advance(5, seconds=0.25)  # 50 images in a quarter second
    second = client.get("/metrics").text
    assert sample(second, "mnist_training_images_per_second") == pytest.approx(200.0)


def test_a_job_whose_lease_ran_out_trains_no_images(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    """Its worker died (or stalls): the job stays running until another claims it, and the
    last rate it was seen at used to stand all that while."""
    training = FakeTraining(sessions, JobCreate(epochs=2, batch_size=10, trainset_size=100))
    training.submit()
    training.claim()
    training.advance(5, seconds=1.0)
    assert sample(client.get("/metrics").text, "mnist_training_images_per_second") == 50.0
    lapse_leases(sessions)
    later = client.get("/metrics").text
    assert sample(later, "mnist_jobs", status="running") == 1
    assert sample(later, "mnist_training_images_per_second") == 0


def test_a_trailing_slash_is_redirected_relative_whatever_the_host(client: TestClient) -> None:
    """Starlette wrote Location from the Host header: `Host: evil.example` sent a client (or
    a cache in front) to http://evil.example/jobs."""
    job_id = client.post("/jobs", json={}).json()["id"]
    for path, where in [
        ("/jobs/", "/jobs"),
        ("/jobs/?limit=2", "/jobs?limit=2"),
        (f"/jobs/{job_id}/", f"/jobs/{job_id}"),
        ("/sweeps/", "/sweeps"),
    ]:
        answer = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        assert (answer.status_code, answer.headers["location"]) == (307, where), path
    assert client.post("/sweeps/", json={}, follow_redirects=False).headers["location"] == "/sweeps"
    unknown = client.get("/nothing/here/", follow_redirects=False)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "http_404"


def test_callers_of_readyz_do_not_queue_behind_a_probe_that_waits(
    sqlite_url: str, api_settings: Settings
) -> None:
    """Another process holds the write lock: the one probe waits for it (SQLite's 30 s busy
    timeout). Callers used to queue behind that probe, each holding a thread of the pool, and
    a hundred of them (no key needed) stalled every other route for as long."""
    settings = api_settings.model_copy(update={"database_url": sqlite_url})
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    holder.execute("BEGIN IMMEDIATE")
    answers: list[int] = []
    try:
        with TestClient(create_app(settings)) as client:

            def ready() -> None:
                answers.append(client.get("/readyz").status_code)

            callers = [threading.Thread(target=ready, daemon=True) for _ in range(8)]
            for caller in callers:
                caller.start()
            # All but the one probing answer while the lock is still held, well within the
            # busy timeout (before, each of them waited it out).
            wait_for(lambda: len(answers) >= 7, timeout_s=20, what="the callers' answers")
            assert client.get("/jobs").status_code == 200  # the other routes are served
            holder.rollback()
            for caller in callers:
                caller.join(timeout=40)
            assert answers.count(503) >= 7  # "the first probe is under way"
            assert client.get("/readyz").status_code == 200  # the lock gone, a new probe
    finally:
        holder.close()


def test_not_ready_once_the_sqlite_file_is_removed_under_it(
    sqlite_url: str, api_settings: Settings
) -> None:
    """The pooled connections read and write the removed file on: /readyz said ready and jobs
    were accepted into a file gone with the process (a review, twice)."""
    settings = api_settings.model_copy(update={"database_url": sqlite_url})
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            (path.parent / name).unlink(missing_ok=True)
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert "database: its file (or its -wal) was removed" in answer.json()["error"]["message"]


@pytest.mark.parametrize("removed", ["-wal", "-wal and -shm"])
def test_not_ready_once_the_sqlite_wal_is_removed_under_it(
    sqlite_url: str, api_settings: Settings, removed: str
) -> None:
    """Deleting the -wal (and -shm) split the database: these processes wrote on to the
    removed -wal, a new one read the file without it (a job that had succeeded was running
    there) and its own new jobs went unseen here, and /readyz said ready (a review, twice)."""
    settings = api_settings.model_copy(update={"database_url": sqlite_url})
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    with TestClient(create_app(settings)) as client:
        assert client.post("/jobs", json={}).status_code == 202  # the -wal holds something
        assert client.get("/readyz").status_code == 200
        for suffix in removed.split(" and "):
            (path.parent / f"{path.name}{suffix}").unlink()
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert "database: its file (or its -wal) was removed" in answer.json()["error"]["message"]


def test_not_ready_and_no_size_while_the_sqlite_folder_cannot_be_searched(
    sqlite_url: str, api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its folder at mode 000 (root without CAP_DAC_OVERRIDE): the size's stat raised
    PermissionError, /readyz and /metrics answered 500, and /readyz said the file was "removed
    or replaced". The stat is made to fail rather than the mode changed (root passes it)."""
    settings = api_settings.model_copy(update={"database_url": sqlite_url})
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    real_stat = os.stat

    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if isinstance(target, str | Path) and Path(target).name.startswith(path.name):
            raise PermissionError(13, "Permission denied", str(target))
        return real_stat(target, *args, **kwargs)

    with TestClient(create_app(settings)) as client:
        assert client.get("/jobs").status_code == 200  # its connections are open
        monkeypatch.setattr(os, "stat", stat)
        answer = client.get("/readyz")
        metrics = client.get("/metrics")
        monkeypatch.undo()
        assert client.get("/readyz").status_code == 200  # the folder back
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert "database: its file cannot be read (PermissionError)" in message
    assert "storage: SQLite file and WAL cannot be read" in message
    assert metrics.status_code == 200
    assert "\nmnist_store_bytes" not in metrics.text and "\nmnist_jobs" in metrics.text
