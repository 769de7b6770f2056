"""API keys: every route × (no key, wrong key, read-only key, full key), and the rules behind it."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select
from starlette.routing import Route

from service.api.app import all_routes, create_app
from service.api.security import (
    Access,
    ApiKeyMiddleware,
    KeyRing,
    bearer_token,
    exposure_problem,
    is_loopback,
    required_access,
)
from service.settings import Settings
from service.store.engines import make_engine
from service.store.tables import Job
from tests.support import app_settings

FULL_KEY = "full-key-for-the-tests-0001"
READONLY_KEY = "readonly-key-for-tests-0002"
WRONG_KEY = "not-a-key-the-server-knows"
VALID_JOB_ID = "0" * 32
KEYS: dict[str, dict[str, str]] = {
    "no key": {},
    "wrong key": {"Authorization": f"Bearer {WRONG_KEY}"},
    "read-only key": {"Authorization": f"Bearer {READONLY_KEY}"},
    "full key": {"Authorization": f"Bearer {FULL_KEY}"},
}
# What the operations this module knows answer once let through (a fresh database, no
# model); a route added later is checked for the auth outcome alone.
PASSED_THROUGH: dict[tuple[str, str], int] = {
    ("GET", "/healthz"): 200,
    ("GET", "/jobs"): 200,
    ("POST", "/jobs"): 202,
    ("GET", "/jobs/{job_id}"): 404,
    ("POST", "/jobs/{job_id}/cancel"): 404,
    ("GET", "/jobs/{job_id}/metrics"): 404,
    ("POST", "/sweeps"): 422,  # neither grid nor random
    ("GET", "/sweeps"): 200,
    ("GET", "/sweeps/{sweep_id}"): 404,
    ("POST", "/sweeps/{sweep_id}/cancel"): 404,
    ("DELETE", "/sweeps/{sweep_id}"): 404,
    ("POST", "/predict"): 422,  # no file sent
    ("GET", "/openapi.json"): 200,
    ("GET", "/docs"): 200,
    ("GET", "/redoc"): 200,
    ("GET", "/docs/oauth2-redirect"): 200,
}
# What the rules must say for them: a change to these is a change to who may do what.
EXPECTED_ACCESS: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): Access.PUBLIC,
    ("GET", "/readyz"): Access.PUBLIC,
    ("HEAD", "/healthz"): Access.PUBLIC,
    ("HEAD", "/readyz"): Access.PUBLIC,
    ("GET", "/"): Access.PUBLIC,
    ("GET", "/static/app.js"): Access.PUBLIC,
    ("GET", "/openapi.json"): Access.PUBLIC,
    ("GET", "/jobs"): Access.READ,
    ("GET", "/jobs/{job_id}"): Access.READ,
    ("GET", "/jobs/{job_id}/metrics"): Access.READ,
    ("GET", "/jobs/{job_id}/events"): Access.READ,
    ("GET", "/metrics"): Access.READ,
    ("GET", "/models"): Access.READ,
    ("POST", "/predict"): Access.READ,
    ("POST", "/predict/batch"): Access.READ,
    ("POST", "/jobs"): Access.WRITE,
    ("POST", "/jobs/{job_id}/cancel"): Access.WRITE,
    ("DELETE", "/jobs/{job_id}"): Access.WRITE,
    ("GET", "/sweeps"): Access.READ,
    ("GET", "/sweeps/{sweep_id}"): Access.READ,
    ("POST", "/sweeps"): Access.WRITE,
    ("POST", "/sweeps/{sweep_id}/cancel"): Access.WRITE,
    ("DELETE", "/sweeps/{sweep_id}"): Access.WRITE,
    ("PUT", "/models/aliases/{name}"): Access.WRITE,
    ("DELETE", "/models/aliases/{name}"): Access.WRITE,
    ("POST", "/healthz"): Access.WRITE,
    ("POST", "/predictions"): Access.WRITE,  # not under /predict/
    ("GET", "/static/../jobs"): Access.READ,  # no riding a public prefix
    ("GET", "/static//jobs"): Access.READ,
}


def operations() -> list[tuple[str, str]]:
    """(method, path template) of every route of the app, including ones added later, and
    every documented operation (the two should agree)."""
    app = create_app(app_settings("sqlite://", Path("."), api_key=SecretStr(FULL_KEY)))
    found = {
        (method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item
    }
    for route in all_routes(app):
        if isinstance(route, Route) and route.methods:
            found |= {(method, route.path) for method in route.methods if method != "HEAD"}
    assert ("POST", "/jobs") in found
    return sorted(found)


def concrete(path: str) -> str:
    """A request path for a template: job ids valid, other parameters plain words."""
    path = path.replace("{job_id}", VALID_JOB_ID).replace("{sweep_id}", VALID_JOB_ID)
    return re.sub(r"\{[^}]+\}", "x", path)


@pytest.fixture
def keyed_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    return app_settings(
        sqlite_url,
        tmp_path,
        api_key=SecretStr(FULL_KEY),
        readonly_api_key=SecretStr(READONLY_KEY),
    )


@pytest.fixture
def keyed_client(keyed_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed_settings)) as client:
        yield client


def count_jobs(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(Job)).scalar_one()
    engine.dispose()
    return int(n)


@pytest.mark.parametrize(("method", "path"), operations())
@pytest.mark.parametrize("who", list(KEYS))
def test_auth_matrix(
    keyed_client: TestClient, keyed_settings: Settings, method: str, path: str, who: str
) -> None:
    needed = required_access(method, path)
    if (method, path) in EXPECTED_ACCESS:
        assert needed is EXPECTED_ACCESS[method, path]
    body: dict[str, Any] = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    jobs_before = count_jobs(keyed_settings)

    response = keyed_client.request(method, concrete(path), headers=KEYS[who], **body)

    denied = (needed is not Access.PUBLIC and who in ("no key", "wrong key")) or (
        needed is Access.WRITE and who == "read-only key"
    )
    if denied:
        expected = 403 if who == "read-only key" else 401
        assert response.status_code == expected, response.text
        code = "forbidden" if expected == 403 else "unauthorized"
        assert response.json()["error"]["code"] == code
        assert response.headers["www-authenticate"].startswith('Bearer realm="mnist"')
        assert count_jobs(keyed_settings) == jobs_before, "a refused request changed something"
    else:
        assert response.status_code not in (401, 403), response.text
        if (method, path) in PASSED_THROUGH:
            assert response.status_code == PASSED_THROUGH[method, path], response.text


@pytest.mark.parametrize(("method", "path"), list(EXPECTED_ACCESS))
def test_the_rules(method: str, path: str) -> None:
    assert required_access(method, path) is EXPECTED_ACCESS[method, path]


def test_docs_can_be_made_private() -> None:
    assert required_access("GET", "/docs", docs_public=False) is Access.READ
    assert required_access("GET", "/openapi.json", docs_public=False) is Access.READ
    assert required_access("GET", "/healthz", docs_public=False) is Access.PUBLIC


def test_the_challenges_say_what_is_wrong(keyed_client: TestClient) -> None:
    missing = keyed_client.get("/jobs")
    assert missing.headers["www-authenticate"] == 'Bearer realm="mnist"'
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    wrong = keyed_client.get("/jobs", headers=KEYS["wrong key"])
    assert wrong.headers["www-authenticate"] == 'Bearer realm="mnist", error="invalid_token"'
    readonly = keyed_client.post("/jobs", json={}, headers=KEYS["read-only key"])
    assert 'error="insufficient_scope"' in readonly.headers["www-authenticate"]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (f"Bearer {FULL_KEY}".encode(), FULL_KEY.encode()),
        (f"bearer {FULL_KEY}".encode(), FULL_KEY.encode()),
        (f"  BEARER   {FULL_KEY}  ".encode(), FULL_KEY.encode()),
        (f"Basic {FULL_KEY}".encode(), None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (FULL_KEY.encode(), None),
        (None, None),
    ],
)
def test_bearer_tokens_are_read_strictly(header: bytes | None, token: bytes | None) -> None:
    assert bearer_token(header) == token


def test_a_key_with_anything_around_it_is_wrong(keyed_client: TestClient) -> None:
    for value in (f"Bearer {FULL_KEY}x", f"Bearer x{FULL_KEY}", f"Bearer {FULL_KEY[:-1]}"):
        assert keyed_client.get("/jobs", headers={"Authorization": value}).status_code == 401


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    ring = KeyRing(FULL_KEY, READONLY_KEY)
    assert ring.grant(FULL_KEY.encode()) is Access.WRITE
    assert ring.grant(READONLY_KEY.encode()) is Access.READ
    assert ring.grant(WRONG_KEY.encode()) is None
    # Both keys are compared every time, whichever matches.
    assert len(compared) == 6
    assert {b for _, b in compared} == {FULL_KEY.encode(), READONLY_KEY.encode()}


def test_without_a_key_the_api_is_open(keyed_settings: Settings) -> None:
    open_settings = keyed_settings.model_copy(update={"api_key": None, "readonly_api_key": None})
    with TestClient(create_app(open_settings)) as client:
        assert client.get("/jobs").status_code == 200
        assert client.post("/jobs", json={}).status_code == 202
        schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema["components"]
    assert "401" not in schema["paths"]["/jobs"]["post"]["responses"]


def test_an_open_api_cuts_a_key_out_of_every_query_as_a_keyed_one_does(
    keyed_settings: Settings,
) -> None:
    """A browser that kept a key (the dashboard adds it to a stream's URL) met 422 "unknown
    query parameter 'access_token'" on every route, and the key was in the access log."""
    seen: list[bytes] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["query_string"])
        await ok(scope, receive, send)

    open_check = ApiKeyMiddleware(inner, keys=None, docs_public=True)
    for path in (f"/jobs/{VALID_JOB_ID}/events", "/jobs"):
        scope = {"type": "http", "method": "GET", "path": path, "headers": []}
        query = b"access_token=stale&limit=2&access%5Ftoken=again"
        assert call(open_check, {**scope, "query_string": query})[0]["status"] == 200
    assert seen == [b"limit=2", b"limit=2"]

    open_settings = keyed_settings.model_copy(update={"api_key": None, "readonly_api_key": None})
    with TestClient(create_app(open_settings)) as client:
        job_id = client.post("/jobs", json={}).json()["id"]
        for path in ("/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/metrics"):
            assert client.get(f"{path}?access_token=stale").status_code == 200, path


def test_the_schema_declares_the_scheme_and_the_refusals(keyed_client: TestClient) -> None:
    schema = keyed_client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    submit = schema["paths"]["/jobs"]["post"]
    assert submit["security"] == [{"bearer": []}]
    assert {"401", "403"} <= set(submit["responses"])
    listing = schema["paths"]["/jobs"]["get"]
    assert "401" in listing["responses"] and "403" not in listing["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def call(app: Callable[..., Any], scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one request (a raw scope: no client normalises its path) through ``app``."""
    sent: list[dict[str, Any]] = []
    first = {"type": "websocket.connect" if scope["type"] == "websocket" else "http.request"}

    async def receive() -> dict[str, Any]:
        return first

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, {"headers": [], "root_path": "", "method": "GET", **scope}, receive, send)
    return sent


def call_raw(app: Callable[..., Any], path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The status of a GET of ``path`` through ``app``."""
    return int(call(app, {"type": "http", "path": path, "headers": headers})[0]["status"])


async def ok(scope: Any, receive: Any, send: Any) -> None:
    """An app that answers 200 to everything."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_dot_segments_do_not_ride_a_public_prefix() -> None:
    guarded = ApiKeyMiddleware(ok, keys=KeyRing(FULL_KEY), docs_public=True)
    assert call_raw(guarded, "/static/app.js", []) == 200
    assert call_raw(guarded, "/static/../jobs", []) == 401
    assert call_raw(guarded, "/static/./../jobs", []) == 401
    auth = [(b"authorization", f"Bearer {FULL_KEY}".encode())]
    assert call_raw(guarded, "/static/../jobs", auth) == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_public_address_needs_a_key_or_an_explicit_opt_out(tmp_path: Path) -> None:
    def settings(**values: Any) -> Settings:
        return app_settings("sqlite://", tmp_path, **values)

    problem = exposure_problem(settings(host="0.0.0.0"))
    assert problem is not None
    for hint in ("MNIST_API_KEY", "MNIST_HOST=127.0.0.1", "MNIST_ALLOW_NO_AUTH=true"):
        assert hint in problem
    assert exposure_problem(settings(host="0.0.0.0", api_key=SecretStr(FULL_KEY))) is None
    assert exposure_problem(settings(host="0.0.0.0", allow_no_auth=True)) is None
    assert exposure_problem(settings(host="127.0.0.1")) is None


def test_a_websocket_without_the_key_is_closed_before_the_app_sees_it() -> None:
    reached: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    guarded = ApiKeyMiddleware(inner, keys=KeyRing(FULL_KEY), docs_public=True)
    refused = call(guarded, {"type": "websocket", "path": "/jobs/x/ws"})
    assert refused == [{"type": "websocket.close", "code": 1008}] and reached == []
    auth = [(b"authorization", f"Bearer {FULL_KEY}".encode())]
    assert call(guarded, {"type": "websocket", "path": "/jobs/x/ws", "headers": auth}) == []
    assert reached == ["/jobs/x/ws"]


def test_rules_apply_to_the_path_inside_the_app_when_mounted_under_a_prefix() -> None:
    guarded = ApiKeyMiddleware(ok, keys=KeyRing(FULL_KEY), docs_public=True)
    for path, status in (("/mnist/healthz", 200), ("/mnist/jobs", 401)):
        sent = call(guarded, {"type": "http", "path": path, "root_path": "/mnist"})
        assert sent[0]["status"] == status


def test_only_the_event_stream_may_carry_the_key_in_the_query() -> None:
    seen: list[bytes] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["query_string"])
        await ok(scope, receive, send)

    guarded = ApiKeyMiddleware(inner, keys=KeyRing(FULL_KEY), docs_public=True)
    stream = [(b"accept", b"text/event-stream")]
    query = f"after=3&access_token={FULL_KEY}&x=1".encode()
    events = f"/jobs/{VALID_JOB_ID}/events"

    def status(method: str, query_string: bytes, path: str = events, headers: Any = stream) -> int:
        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        return int(call(guarded, {**scope, "query_string": query_string})[0]["status"])

    assert status("GET", query) == 200
    # The app (and uvicorn's access log, which reads the same scope) never sees the key.
    assert seen == [b"after=3&x=1"]
    assert status("GET", query, headers=[]) == 200  # what the client accepts changes nothing
    assert status("POST", query) == 401  # not a read
    assert status("GET", b"access_token=" + WRONG_KEY.encode()) == 401
    escaped = b"access_token=" + FULL_KEY.replace("-", "%2D").encode()
    assert status("GET", escaped) == 200
    # The name counts as the app would decode it: an encoded name is the same parameter.
    for name in (b"access%5Ftoken", b"%61ccess_token", b"access%5ftoken"):
        assert status("GET", name + b"=" + FULL_KEY.encode() + b"&y=2") == 200
        assert seen[-1] == b"y=2"
    # Anywhere else the key in a query is refused, even on a stream-like request, and cut.
    for path in (f"/models/{VALID_JOB_ID}/checkpoint", "/jobs", f"/jobs/{VALID_JOB_ID}"):
        assert status("GET", query, path=path) == 401, path
        assert status("GET", b"access%5Ftoken=" + FULL_KEY.encode(), path=path) == 401, path
    assert all(b"access_token" not in q and b"5Ftoken" not in q.upper() for q in seen)


def test_a_request_presenting_more_than_one_key_is_400() -> None:
    """RFC 6750, section 2: one way, once. Which key counted was a matter of position (the
    first header, the last parameter): a full key then a wrong one passed."""
    guarded = ApiKeyMiddleware(ok, keys=KeyRing(FULL_KEY, READONLY_KEY), docs_public=True)
    full, readonly = (f"Bearer {k}".encode() for k in (FULL_KEY, READONLY_KEY))
    events = f"/jobs/{VALID_JOB_ID}/events"

    def answer(path: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> Any:
        scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
        return call(guarded, {**scope, "query_string": query})

    twice = [
        ("/jobs", [(b"authorization", full), (b"authorization", b"Bearer not-a-key")], b""),
        ("/jobs", [(b"authorization", readonly), (b"authorization", full)], b""),
        (events, [], f"access_token=x&access_token={FULL_KEY}".encode()),
        (events, [(b"authorization", full)], f"access_token={FULL_KEY}".encode()),
    ]
    for path, headers, query in twice:
        start, body = answer(path, headers, query)
        assert start["status"] == 400, (path, headers, query)
        assert b"more than one key" in body["body"]
        assert (b"www-authenticate", b'Bearer realm="mnist", error="invalid_request"') in start[
            "headers"
        ]
    # A public path reads no key: two are no reason to refuse it.
    assert answer("/healthz", twice[0][1])[0]["status"] == 200
    assert answer("/jobs", [(b"authorization", full)])[0]["status"] == 200
    # What is no key does not count: a proxy's Basic header beside the stream's parameter (a
    # browser's EventSource behind HTTP auth), an empty parameter, one where none is read.
    basic = [(b"authorization", b"Basic dXNlcjpwYXNz")]
    assert answer(events, basic, f"access_token={FULL_KEY}".encode())[0]["status"] == 200
    assert answer(events, [(b"authorization", full)], b"access_token=")[0]["status"] == 200
    assert answer("/jobs", [(b"authorization", full)], b"access_token=x")[0]["status"] == 200
    head = {"type": "http", "method": "HEAD", "path": events, "headers": []}
    assert (
        call(guarded, {**head, "query_string": f"access_token={FULL_KEY}".encode()})[0]["status"]
        == 200
    )  # a HEAD is the GET's (HeadAsGet sits inside this check)
