"""JSON bodies (service/api/json_bodies.py): every route reads them alike, a key named twice in
one object refused, nothing stored from such a body."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import service.api
from service.api.app import all_routes, create_app
from service.api.json_bodies import JsonBodyRoute, RepeatedKey, loads
from tests.support import app_settings

JSON_TYPE = {"content-type": "application/json"}
ROW = json.dumps([0] * 28)
PIXELS = "[" + ",".join([ROW] * 28) + "]"


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(sqlite_url, tmp_path))) as client:
        yield client


def test_every_route_with_a_json_body_reads_it_as_one_place_says(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A router added without the route class would read its bodies with Starlette's reader
    (the last of a repeated key winning): each route that takes a body reads it here."""
    app = create_app(app_settings(sqlite_url, tmp_path))
    routes = all_routes(app)
    with_body = [r for r in routes if isinstance(r, APIRoute) and r.body_field is not None]
    assert {r.path for r in with_body} >= {"/jobs", "/sweeps", "/models/aliases/{name}"}
    assert [r.path for r in with_body if not isinstance(r, JsonBodyRoute)] == []


def test_no_other_module_of_the_api_reads_json() -> None:
    """A route reading ``await request.json()`` on its own, or a lane with ``json.loads``,
    would take a repeated key's last value: the API's Python reads JSON only here."""
    api = Path(service.api.__file__).parent
    readers = re.compile(r"json\.loads\(|\.json\(\)|model_validate_json\(|orjson")
    found = [
        f"{path.relative_to(api)}:{number}"
        for path in sorted(api.rglob("*.py"))
        if path.name != "json_bodies.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if readers.search(line.split("#")[0])
    ]
    assert found == []


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"epochs": 1, "epochs": 2}', "epochs"),
        ('{"a": {"x": 1, "y": 2, "x": 1}}', "x"),
        ('[{"k": 1}, {"k": 1, "k": 1}]', "k"),
        ('{"\\u0065pochs": 1, "epochs": 2}', "epochs"),  # the same key, escaped once
    ],
)
def test_a_key_named_twice_in_one_object_is_refused(text: str, key: str) -> None:
    with pytest.raises(RepeatedKey) as refused:
        loads(text.encode())
    assert refused.value.key == key


def test_the_same_key_in_other_objects_is_read() -> None:
    text = '{"params": {"epochs": 1}, "grid": {"epochs": [1, 2]}, "epoch": 3}'
    assert loads(text.encode()) == json.loads(text)
    assert loads(text.encode("utf-16")) == json.loads(text)  # JSON's encodings, as Starlette's


def test_a_repeated_key_gets_400_on_every_route_and_stores_nothing(client: TestClient) -> None:
    job = client.post("/jobs", json={"epochs": 1}).json()["id"]
    bodies = {
        ("POST", "/jobs"): '{"epochs": 1, "epochs": 100}',
        ("POST", "/sweeps"): '{"params": {"epochs": 1}, "grid": {"seed": [1], "seed": [1, 2]}}',
        ("PUT", "/models/aliases/prod"): f'{{"job_id": "{job}", "job_id": "{job}"}}',
        ("POST", "/predict"): f'{{"pixels": {PIXELS}, "pixels": {PIXELS}}}',
    }
    for (method, path), body in bodies.items():
        answer = client.request(method, path, content=body.encode(), headers=JSON_TYPE)
        assert answer.status_code == 400, (path, answer.text)
        key = body.split('"')[-4] if path == "/sweeps" else body.split('"')[1]
        message = f"the JSON body names {key!r} twice in one object"
        assert answer.json()["error"]["message"] == message, (path, answer.text)
    assert [j["id"] for j in client.get("/jobs").json()["jobs"]] == [job]
    assert client.get("/sweeps").json()["sweeps"] == []
    assert client.get("/models/aliases").json()["aliases"] == []


def test_a_long_repeated_key_is_named_in_part(client: TestClient) -> None:
    key = "k" * 100_000
    body = json.dumps({key: 1})[:-1] + f', "{key}": 2}}'
    answer = client.post("/jobs", content=body.encode(), headers=JSON_TYPE)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert message == f"the JSON body names {'k' * 64 + '…'!r} twice in one object"
