"""The OpenAPI document as client generators read it, and a client generated from it at work.

The document: hand-chosen operationIds, every schema a request or a response names is a
named component, declared tags, a server, ``Location`` on 202, the checkpoint as binary.
The client: ``openapi-python-client`` (offline) turns the live ``/openapi.json`` of a real
server into a package, which submits a job, polls it to the end and predicts with its model.
"""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api import openapi
from service.api.app import create_app
from service.settings import Settings
from tests.support import SMALL_TEST, SMALL_TRAIN, app_settings, wait_for
from tests.test_end_to_end import Service, start_service

CLIENT_PACKAGE = "mnist_service_client"
# The generator takes every content type predict reads but ``image/*``: a raw image is sent as
# the bytes of a File, with this override in the generator's configuration.
GENERATOR_CONFIG = {
    "post_hooks": [],  # no formatter run: nothing outside the venv, nothing downloaded
    "content_type_overrides": {"image/*": "application/octet-stream"},
}


@pytest.fixture
def document(sqlite_url: str, tmp_path: Path) -> dict[str, Any]:
    settings: Settings = app_settings(sqlite_url, tmp_path)
    with TestClient(create_app(settings)) as client:
        answer = client.get("/openapi.json")
        assert answer.status_code == 200
        return dict(answer.json())


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def content_schemas(operation: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    bodies = [operation.get("requestBody", {}), *operation["responses"].values()]
    for body in bodies:
        for media_type, content in body.get("content", {}).items():
            yield media_type, content.get("schema", {})


def test_every_operation_has_its_chosen_id_and_a_declared_tag(document: dict[str, Any]) -> None:
    declared = {tag["name"]: tag.get("description") for tag in document["tags"]}
    assert all(declared.values()), declared
    ids = []
    for method, path, operation in operations(document):
        assert operation["operationId"] == openapi.OPERATION_IDS[(method, path)]
        ids.append(operation["operationId"])
        assert len(operation["tags"]) == 1 and operation["tags"][0] in declared, path
    assert len(ids) == len(set(ids))
    assert {"createJob", "getJobMetrics", "streamJobEvents", "downloadCheckpoint"} <= set(ids)
    assert document["servers"] == openapi.SERVERS


def test_bodies_are_named_schemas_and_the_odd_answers_are_declared(
    document: dict[str, Any],
) -> None:
    for method, path, operation in operations(document):
        for media_type, schema in content_schemas(operation):
            # An inline object would become a class named after the operation and the media
            # type (PredictPredictPostJsonPixelsInput); a union names its members.
            for member in schema.get("anyOf", [schema]):
                assert "$ref" in member or member.get("type") != "object", (method, path)
            assert media_type != "application/json" or schema, (method, path)
    names = document["components"]["schemas"]
    assert {"PredictForm", "PixelsInput", "JobCreate", "ErrorEnvelope"} <= set(names)

    created = document["paths"]["/jobs"]["post"]["responses"]["202"]
    assert created["headers"]["Location"]["required"] is True
    checkpoint = document["paths"]["/models/{job_id}/checkpoint"]["get"]["responses"]["200"]
    assert checkpoint["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    ended = document["paths"]["/jobs/{job_id}/events"]["get"]["responses"]["204"]
    assert "final" in ended["description"]


def test_every_integer_in_a_query_has_its_bounds_in_json_schema_words(
    document: dict[str, Any],
) -> None:
    """A validator placed before a query integer's bounds turned ``minimum``/``maximum`` into
    pydantic's own ``ge``/``le``, which no client reads: a generated client sent limit=4011."""
    found = []
    for _, _, operation in operations(document):
        for parameter in operation.get("parameters", []):
            schema = parameter["schema"]
            integers = [s for s in schema.get("anyOf", []) if s.get("type") == "integer"]
            schema = integers[0] if integers else schema
            if parameter["in"] == "query" and schema.get("type") == "integer":
                found.append(parameter["name"])
                assert {"minimum", "maximum"} <= schema.keys(), (parameter["name"], schema)
                assert not {"ge", "le"} & schema.keys(), (parameter["name"], schema)
    assert {"limit", "after_step", "top_k"} <= set(found)


def test_a_route_without_a_chosen_id_stops_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(openapi.OPERATION_IDS, ("GET", "/workers"))
    with pytest.raises(LookupError, match="GET /workers has no operationId"):
        create_app(Settings(database_url="sqlite://"))


@pytest.fixture
def service(sqlite_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[Service]:
    yield from start_service(sqlite_url, small_mnist, tmp_path)


@pytest.fixture
def generated(service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The package ``openapi-python-client`` makes from the server's live document, imported."""
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(service.client.get("/openapi.json").json()))
    config = tmp_path / "generator.json"
    config.write_text(json.dumps(GENERATOR_CONFIG))
    out = tmp_path / "generated" / CLIENT_PACKAGE
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec)]
    command += ["--config", str(config), "--meta", "none", "--output-path", str(out)]
    made = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "Warning" not in made.stdout + made.stderr, made.stdout + made.stderr
    monkeypatch.syspath_prepend(str(out.parent))
    try:
        yield importlib.import_module(CLIENT_PACKAGE)
    finally:
        for name in [m for m in sys.modules if m.partition(".")[0] == CLIENT_PACKAGE]:
            del sys.modules[name]


def digit_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_generated_client_submits_polls_and_predicts(service: Service, generated: Any) -> None:
    api = importlib.import_module(f"{CLIENT_PACKAGE}.api")
    jobs_api = importlib.import_module(f"{CLIENT_PACKAGE}.api.jobs")
    predict_api = importlib.import_module(f"{CLIENT_PACKAGE}.api.predict.predict")
    models_api = importlib.import_module(f"{CLIENT_PACKAGE}.api.models")
    models = importlib.import_module(f"{CLIENT_PACKAGE}.models")
    types = importlib.import_module(f"{CLIENT_PACKAGE}.types")
    assert api is not None
    client = generated.Client(
        base_url=str(service.client.base_url), raise_on_unexpected_status=True
    )

    body = models.JobCreate(epochs=1, trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST)
    created = importlib.import_module(f"{jobs_api.__name__}.create_job").sync_detailed(
        client=client, body=body
    )
    assert created.status_code == 202
    job = created.parsed
    assert created.headers["location"] == f"/jobs/{job.id}"
    get_job = importlib.import_module(f"{jobs_api.__name__}.get_job")

    def finished() -> Any:
        polled = get_job.sync(job.id, client=client)
        return polled if polled.status.value in {"succeeded", "failed", "cancelled"} else None

    done = wait_for(finished, timeout_s=120, what=f"job {job.id} to end")
    assert done.status == models.JobStatus.SUCCEEDED and done.step == done.total_steps

    metrics = importlib.import_module(f"{jobs_api.__name__}.get_job_metrics").sync(
        job.id, client=client, after_step=0
    )
    assert [s.step for s in metrics.steps] == list(range(1, done.total_steps + 1))

    image = types.File(payload=io.BytesIO(digit_png()), file_name="d.png", mime_type="image/png")
    answers = [
        predict_api.sync(client=client, body=models.PredictForm(file=image)),
        predict_api.sync(client=client, body=models.PixelsInput(pixels=[[0.0] * 28] * 28)),
        predict_api.sync(client=client, body=types.File(payload=io.BytesIO(digit_png()))),
    ]
    for answer in answers:
        assert isinstance(answer, models.Prediction) and answer.job_id == job.id
        assert 0 <= answer.digit <= 9 and len(answer.probabilities) == 10

    weights = importlib.import_module(f"{models_api.__name__}.download_checkpoint").sync(
        job.id, client=client
    )
    state = torch.load(io.BytesIO(weights.payload.read()), weights_only=True)
    assert "net.1.weight" in state, list(state)  # the tutorial SimpleMLP's state_dict
