"""Errors tell the client what it did wrong and nothing about the server; 500s carry an id."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError, ProgrammingError

from service.api.app import create_app
from service.api.lanes import predict as predict_lane
from tests.support import app_settings

SECRET_PATH = "/srv/secret/internal/module.py"


@pytest.fixture
def app(sqlite_url: str, tmp_path: Path) -> FastAPI:
    app = create_app(app_settings(sqlite_url, tmp_path))

    @app.get("/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError(f"failed at {SECRET_PATH} with password=hunter2")

    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_a_500_carries_a_request_id_and_nothing_else(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="service"):
        response = client.get("/boom")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error"
    rid = response.headers["x-request-id"]
    assert error["request_id"] == rid
    assert rid in error["message"]
    for leak in (SECRET_PATH, "hunter2", "Traceback", "RuntimeError", ".py"):
        assert leak not in response.text
    # The log has what the client does not: the id, and the traceback under it, once.
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert SECRET_PATH in str(logged[0].exc_info[1])


def test_an_error_in_the_services_own_layers_is_a_500_with_a_request_id(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fault in a fast lane (in front of FastAPI, see ServiceApp) and not in a route.
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"lane failed at {SECRET_PATH}")

    monkeypatch.setattr(predict_lane.PredictLane, "_eligible", broken)
    with caplog.at_level(logging.ERROR, logger="service"):
        response = client.post(
            "/predict", content=b"\x89PNG", headers={"content-type": "image/png"}
        )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error"
    assert error["request_id"] == response.headers["x-request-id"]
    assert SECRET_PATH not in response.text
    assert sum(error["request_id"] in r.getMessage() for r in caplog.records) == 1


def test_every_response_has_a_request_id(client: TestClient) -> None:
    seen = set()
    for response in (
        client.get("/healthz"),
        client.get("/jobs/not-an-id"),
        client.post("/jobs", json={"epochs": 0}),
        client.get("/nowhere"),
        client.get("/boom"),
    ):
        rid = response.headers["x-request-id"]
        assert len(rid) == 32
        seen.add(rid)
    assert len(seen) == 5


def test_a_plain_client_request_id_is_kept_and_a_strange_one_replaced(client: TestClient) -> None:
    kept = client.get("/healthz", headers={"X-Request-ID": "client-trace.42:a_b"})
    assert kept.headers["x-request-id"] == "client-trace.42:a_b"
    for strange in ("has space", "x" * 129, "new\\nline", "<script>"):
        response = client.get("/healthz", headers={"X-Request-ID": strange})
        assert response.headers["x-request-id"] != strange


def test_validation_errors_name_the_field_without_echoing_the_input(client: TestClient) -> None:
    marker = "<script>alert(1)</script>"
    response = client.post("/jobs", json={"epochs": marker})
    assert response.status_code == 422
    assert "epochs" in response.json()["error"]["message"]
    assert marker not in response.text


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    response = client.request("DELETE", "/jobs")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "http_405"
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "HEAD", "POST"}
    docs = client.post("/docs")  # HEAD comes with GET (HeadAsGet; Starlette too)
    assert {m.strip() for m in docs.headers["allow"].split(",")} == {"GET", "HEAD"}
    cancel = client.get(f"/jobs/{'0' * 32}/cancel")
    assert cancel.headers["allow"] == "POST"


def test_the_schema_documents_the_envelope_for_every_error(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    envelope = "#/components/schemas/ErrorEnvelope"
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "500" in responses, (method, path)
            for status, response in responses.items():
                assert "X-Request-ID" in response["headers"], (method, path, status)
                if status.startswith(("4", "5")):
                    content = response["content"]["application/json"]["schema"]
                    assert content == {"$ref": envelope}, (method, path, status)


def test_a_database_error_that_is_a_bug_stays_a_500_and_an_outage_is_a_503(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bug = ProgrammingError("SELEC 1", {}, sqlite3.OperationalError('near "SELEC": syntax error'))

    def broken(*_args: object, **_kwargs: object) -> None:
        raise bug

    monkeypatch.setattr("service.domain.jobs.list_page", broken)
    response = client.get("/jobs")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert "SELEC" not in response.text and "retry-after" not in response.headers

    # The same place failing because SQLite cannot open its file: an outage, not a bug.
    engine = create_engine(f"sqlite:///{tmp_path}")  # a folder
    with pytest.raises(OperationalError) as raised, engine.connect():
        pass
    engine.dispose()
    outage = raised.value

    def unavailable(*_args: object, **_kwargs: object) -> None:
        raise outage

    monkeypatch.setattr("service.domain.jobs.list_page", unavailable)
    response = client.get("/jobs")
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert response.json() == {
        "error": {
            "code": "database_unavailable",
            "message": "the database is unavailable right now; try again shortly",
        }
    }
    assert response.headers["x-request-id"]
