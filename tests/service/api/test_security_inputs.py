"""Inputs: strict models, bounded strings, ids checked before the database, no user paths."""

from __future__ import annotations

import inspect
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from service import schemas
from service.api.app import create_app
from service.errors import Conflict
from service.ml import SimpleMLP
from service.serving.predictor import ModelCache
from service.store import job_repo
from tests.support import app_settings, files_only


def api_models() -> list[type[BaseModel]]:
    """Every Pydantic model of the API, including ones added to service.schemas later."""
    return [
        model
        for _, model in inspect.getmembers(schemas, inspect.isclass)
        if issubclass(model, BaseModel) and model.__module__ == schemas.__name__
    ]


@pytest.mark.parametrize("model", api_models(), ids=lambda m: m.__name__)
def test_every_model_forbids_extra_fields_and_non_finite_floats(model: type[BaseModel]) -> None:
    assert model.model_config.get("extra") == "forbid"
    assert model.model_config.get("allow_inf_nan") is False


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_floats_are_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        schemas.JobCreate.model_validate_json(f'{{"learning_rate": {value}}}')


def test_integral_floats_are_integers_but_fractions_text_and_booleans_are_not() -> None:
    assert schemas.JobCreate.model_validate_json('{"epochs": 3.0, "seed": 7.0}').epochs == 3
    for bad in ('{"epochs": 2.5}', '{"epochs": "3"}', '{"epochs": true}', '{"seed": 1e300}'):
        with pytest.raises(ValidationError):
            schemas.JobCreate.model_validate_json(bad)


def _strings(schema: dict[str, Any], components: dict[str, Any], where: str) -> Iterator[Any]:
    """(where, schema) of every string in a request schema, following $refs and unions."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        yield from _strings(components[name], components, f"{where}→{name}")
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key, []):
            yield from _strings(option, components, where)
    if schema.get("type") == "string":
        yield where, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _strings(prop, components, f"{where}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _strings(schema["items"], components, f"{where}[]")


def test_every_string_a_client_sends_is_bounded(tmp_path: Path) -> None:
    document = create_app(app_settings("sqlite://", tmp_path)).openapi()
    components = document["components"]["schemas"]
    unbounded = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            found = [
                *(
                    s
                    for p in operation.get("parameters", [])
                    for s in _strings(p["schema"], components, f"{p['in']}.{p['name']}")
                ),
                *(
                    s
                    for content in operation.get("requestBody", {}).get("content", {}).values()
                    for s in _strings(content["schema"], components, "body")
                ),
            ]
            for where, schema in found:
                is_file = schema.get("format") == "binary" or "contentMediaType" in schema
                bounded = {"maxLength", "pattern", "enum", "const"} & schema.keys()
                if not (bounded or is_file):  # files: MNIST_MAX_UPLOAD_BYTES and the body cap
                    unbounded.append(f"{method.upper()} {path} {where}")
    assert unbounded == []


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(sqlite_url, tmp_path))) as client:
        yield client


@pytest.mark.parametrize(
    "bad_id",
    ["not-an-id", "0" * 31, "0" * 33, "G" * 32, "'; DROP TABLE jobs; --", "..%2F..%2Fetc"],
)
def test_ids_are_checked_before_the_database(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, bad_id: str
) -> None:
    def no_query(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a malformed id reached the database")

    monkeypatch.setattr(job_repo, "get_job", no_query)
    for response in (
        client.get(f"/jobs/{bad_id}"),
        client.get(f"/jobs/{bad_id}/metrics"),
        client.post(f"/jobs/{bad_id}/cancel"),
        client.post(f"/predict?job_id={bad_id}", files={"file": ("d.png", b"x")}),
    ):
        assert response.status_code in (404, 422), response.text


def test_a_checkpoint_name_cannot_leave_the_checkpoints_folder(tmp_path: Path) -> None:
    inside = tmp_path / "models"
    inside.mkdir()
    outside = tmp_path / "secret.pt"
    torch.save(SimpleMLP().state_dict(), outside)
    cache = ModelCache(files_only(inside), capacity=2)
    for name in ("../secret.pt", str(outside), "models/../../secret.pt"):
        with pytest.raises(Conflict):
            anyio.run(cache.get, name)
    assert cache.loads == 0
    # …while a name inside it loads.
    torch.save(SimpleMLP().state_dict(), inside / "secret.pt")
    anyio.run(cache.get, "../secret.pt")
    assert cache.loads == 1


def test_the_error_envelope_is_strict_too() -> None:
    body = {"error": {"code": "x", "message": "y", "request_id": "r"}}
    assert schemas.ErrorEnvelope.model_validate(body).error.request_id == "r"
    with pytest.raises(ValidationError):
        schemas.ErrorEnvelope.model_validate_json(json.dumps({**body, "trace": "..."}))


def test_a_body_json_cannot_read_is_told_what_is_wrong(client: TestClient) -> None:
    # FastAPI answers these "There was an error parsing the body": which error, it does not say.
    json_type = {"content-type": "application/json"}
    unreadable = {
        b'{"epochs": 1' + b"0" * 4300 + b"}": "a number in the JSON body has more than 4300 digits",
        b'{"epochs": "\xff\xfe"}': "the JSON body is not UTF-8 text",
        b"[" * 100_000 + b"]" * 100_000: "the JSON body nests too deeply to read",
    }
    for (body, message), route in itertools.product(unreadable.items(), ("/jobs", "/predict")):
        answer = client.post(route, content=body, headers=json_type)  # predict reads its own
        assert answer.status_code == 400, (route, answer.text)
        assert answer.json()["error"]["message"] == message
    # A number just under the limit is read, and judged as any other.
    under = client.post("/jobs", content=b'{"epochs": 1' + b"0" * 4000 + b"}", headers=json_type)
    assert under.status_code == 422 and "epochs" in under.json()["error"]["message"]


def test_a_json_object_sent_as_another_type_is_told_to_send_json(client: TestClient) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        answer = client.post(
            "/jobs", content=b'{"epochs": 1}', headers={"content-type": content_type}
        )
        assert answer.status_code == 422
        assert answer.json()["error"]["message"] == (
            f"body: the body must be JSON sent as application/json, not {content_type!r}"
        )
    bare = client.post("/jobs", content=b'{"epochs": 1}')  # no Content-Type: left unread
    assert bare.status_code == 422
    assert bare.json()["error"]["message"] == (
        "body: the body must be JSON sent as application/json, not with no Content-Type"
    )
    # JSON that is no object keeps the model's own message.
    listed = client.post("/jobs", json=[1])
    assert listed.status_code == 422
    assert "valid dictionary" in listed.json()["error"]["message"]
