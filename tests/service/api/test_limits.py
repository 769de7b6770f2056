"""Each limit, hit: body cap (declared and streamed), multipart parts, fields and headers,
the queue cap, the page sizes."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.limits import BodyLimitMiddleware, MultipartGuard, guard_of
from service.settings import Settings
from tests.support import app_settings

CAP = 64 * 1024
BOUNDARY = "limit-test-boundary"


class Recorder:
    """An inner ASGI app that reads the whole body, remembering how much it got."""

    def __init__(self) -> None:
        self.received = 0
        self.reads = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            self.reads += 1
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run(
    app: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """One POST through ``app``: status, headers, body, and how many chunks were pulled."""
    sent: list[dict[str, Any]] = []
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        index = pulled
        pulled += 1
        if index >= len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[index], "more_body": index < len(chunks) - 1}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers}
    anyio.run(app, scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, pulled


def limited(inner: Any, **overrides: int) -> BodyLimitMiddleware:
    limits = {"max_body_bytes": CAP, "max_form_parts": 4, "max_form_field_bytes": 1024}
    return BodyLimitMiddleware(inner, **{**limits, **overrides})


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    inner = Recorder()
    status, headers, body, pulled = run(
        limited(inner), [b"x" * 10], [(b"content-length", str(CAP + 1).encode())]
    )
    assert status == 413 and pulled == 0 and inner.reads == 0
    assert headers[b"connection"] == b"close"
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_a_streamed_body_is_cut_at_the_first_chunk_over_the_cap() -> None:
    # No Content-Length (chunked), or one that lies: the bytes are what count.
    chunk = b"x" * 4096
    chunks = [chunk] * 100  # 400 KiB, cap 64 KiB
    for headers in ([], [(b"content-length", b"10")]):
        inner = Recorder()
        status, response_headers, body, pulled = run(limited(inner), chunks, headers)
        assert status == 413, body
        assert pulled == CAP // len(chunk) + 1  # not one chunk more than needed to know
        assert inner.received <= CAP
        assert response_headers[b"connection"] == b"close"


def test_a_body_at_the_cap_passes() -> None:
    inner = Recorder()
    status, _, body, _ = run(limited(inner), [b"x" * (CAP // 2)] * 2, [])
    assert (status, body, inner.received) == (200, b"ok", CAP)


def multipart(parts: list[tuple[str, bytes]], *, filename: str | None = None) -> bytes:
    """A multipart body; ``filename`` marks every part as a file."""
    out = b""
    for name, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


FORM = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]


def test_multipart_part_count_is_capped() -> None:
    ok = multipart([(f"f{i}", b"v") for i in range(4)])
    assert run(limited(Recorder()), [ok], FORM)[0] == 200
    too_many = multipart([(f"f{i}", b"v") for i in range(5)])
    status, _, body, _ = run(limited(Recorder()), [too_many], FORM)
    assert status == 400 and b"more than 4 parts" in body


def test_multipart_text_fields_are_capped_but_files_only_by_the_body_cap() -> None:
    field = multipart([("note", b"n" * 1025)])
    status, _, body, _ = run(limited(Recorder()), [field], FORM)
    assert status == 400 and b"form field" in body
    file = multipart([("file", b"n" * 10_000)], filename="d.png")
    assert run(limited(Recorder()), [file], FORM)[0] == 200


def test_multipart_part_headers_are_bounded() -> None:
    long_name = multipart([("file", b"x")], filename="a" * 5000)
    status, _, body, _ = run(limited(Recorder()), [long_name], FORM)
    assert status == 400 and b"header" in body.lower()
    many = f"--{BOUNDARY}\r\n".encode()
    many += b"".join(f"X-H{i}: v\r\n".encode() for i in range(20))
    many += b'Content-Disposition: form-data; name="f"\r\n\r\nv\r\n'
    many += f"--{BOUNDARY}--\r\n".encode()
    assert run(limited(Recorder()), [many], FORM)[0] == 400


def test_the_guard_of_a_form_is_left_in_the_scope_for_the_layers_behind() -> None:
    guards: list[MultipartGuard | None] = []

    class Collecting(Recorder):
        """A layer behind the limits that takes the form's parts from their guard."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            guard = guard_of(scope)
            guards.append(guard)
            if guard is not None:
                guard.collect(1 << 20)
            await super().__call__(scope, receive, send)

    body = multipart([("file", b"\r\n--not-the-boundary\r\n")], filename="d.png")
    assert run(limited(Collecting()), [body[:10], body[10:]], FORM)[0] == 200
    (guard,) = guards
    assert guard is not None and guard.ended and guard.collected is not None
    (part,) = guard.collected
    assert part.disposition == {b"name": b"file", b"filename": b"d.png"}
    assert b"".join(part.chunks) == b"\r\n--not-the-boundary\r\n"
    # A body that is not a form has no guard.
    assert run(limited(Collecting()), [b"{}"], [(b"content-type", b"application/json")])[0] == 200
    assert guards[1:] == [None]


def test_a_huge_boundary_is_refused() -> None:
    headers = [(b"content-type", b"multipart/form-data; boundary=" + b"b" * 300)]
    assert run(limited(Recorder()), [b""], headers)[0] == 400


# --- through the app ---------------------------------------------------------------------------


@pytest.fixture
def small_limits(sqlite_url: str, tmp_path: Path) -> Settings:
    return app_settings(
        sqlite_url,
        tmp_path,
        max_upload_bytes=16 * 1024,
        max_request_bytes=32 * 1024,
        max_form_parts=3,
        max_images_per_request=2,
        max_form_field_bytes=256,
    )


@pytest.fixture
def limited_client(small_limits: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(small_limits)) as client:
        yield client


def test_the_app_answers_413_in_its_envelope(limited_client: TestClient) -> None:
    declared = limited_client.post("/jobs", content=b"{" + b" " * 40_000 + b"}")
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "payload_too_large"
    assert "x-request-id" in declared.headers

    def stream() -> Iterator[bytes]:
        yield b"{"
        for _ in range(100):
            yield b" " * 1024

    chunked = limited_client.post(
        "/jobs", content=stream(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert "32768 bytes" in chunked.json()["error"]["message"]


def test_the_app_enforces_the_form_limits(limited_client: TestClient) -> None:
    files = {"file": ("d.png", b"x")}
    too_many = limited_client.post("/predict", files=files, data={"a": "1", "b": "2", "c": "3"})
    assert too_many.status_code == 400 and "parts" in too_many.json()["error"]["message"]
    long_field = limited_client.post("/predict", files=files, data={"a": "x" * 300})
    assert long_field.status_code == 400 and "field" in long_field.json()["error"]["message"]
    long_header = limited_client.post("/predict", files={"file": ("n" * 5000, b"x")})
    assert long_header.status_code == 400
    # A file over MNIST_MAX_UPLOAD_BYTES but under the body cap: the route's own 413.
    big_file = limited_client.post("/predict", files={"file": ("d.png", b"x" * 20_000)})
    assert big_file.status_code == 413 and "file" in big_file.json()["error"]["message"]


def test_the_queue_is_capped(db_url: str, tmp_path: Path) -> None:
    settings = app_settings(db_url, tmp_path, max_queued_jobs=2)
    with TestClient(create_app(settings)) as client:
        first = client.post("/jobs", json={}).json()["id"]
        assert client.post("/jobs", json={}).status_code == 202
        full = client.post("/jobs", json={})
        assert full.status_code == 429
        assert full.headers["retry-after"] == "30"
        assert full.json()["error"]["code"] == "too_many_requests"
        assert "2 jobs are waiting" in full.json()["error"]["message"]
        # Cancelling one makes room; only waiting jobs count.
        assert client.post(f"/jobs/{first}/cancel").status_code == 200
        assert client.post("/jobs", json={}).status_code == 202
        assert len(client.get("/jobs?limit=100").json()["jobs"]) == 3


@pytest.mark.parametrize(
    "url",
    [
        "/jobs?limit=101",
        "/jobs?limit=0",
        "/jobs/{job}/metrics?limit=100001",
        "/jobs/{job}/metrics?after_step=-1",
        "/jobs?cursor=not-a-cursor",
        f"/jobs?cursor={'9' * 17}-{'0' * 32}",
    ],
)
def test_pages_are_capped(limited_client: TestClient, url: str) -> None:
    job = limited_client.post("/jobs", json={}).json()["id"]
    assert limited_client.get(url.format(job=job)).status_code == 422


def test_any_well_formed_cursor_is_a_position(limited_client: TestClient) -> None:
    ids = [limited_client.post("/jobs", json={}).json()["id"] for _ in range(3)]
    page = limited_client.get("/jobs?limit=2").json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    rest = limited_client.get(f"/jobs?limit=2&cursor={page['next']}").json()
    assert [j["id"] for j in rest["jobs"]] == ids[:1] and rest["next"] is None
    # A cursor no page returned still names a place in the list: before everything here.
    assert limited_client.get(f"/jobs?cursor=1-{'f' * 32}").json()["jobs"] == []


def test_a_compressed_body_is_415(limited_client: TestClient) -> None:
    """No route decodes a body; each read the compressed bytes as the body itself."""
    body = json.dumps({"epochs": 1}).encode()
    sent = [
        (gzip.compress(body), "gzip"),
        (body, "br"),  # labelled, not compressed: taken as it was
        (body, "identity, gzip"),
    ]
    for content, coding in sent:
        headers = {"content-type": "application/json", "content-encoding": coding}
        answer = limited_client.post("/jobs", content=content, headers=headers)
        assert answer.status_code == 415, (coding, answer.text)
        assert f"Content-Encoding {coding!r} is not accepted" in answer.json()["error"]["message"]
    assert limited_client.get("/jobs").json()["jobs"] == []  # none was queued
    plain = {"content-type": "application/json", "content-encoding": "identity"}
    assert limited_client.post("/jobs", content=body, headers=plain).status_code == 202


class EarlyAnswer:
    """An inner app that reads ``reads`` messages of the body, then answers 413 itself (as a
    route that caps its own body does)."""

    def __init__(self, reads: int) -> None:
        self.reads = reads

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        for _ in range(self.reads):
            await receive()
        headers = [(b"content-type", b"application/json"), (b"connection", b"keep-alive")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize(
    ("chunks", "headers", "reads", "closes"),
    [
        ([b"x" * 10] * 3, [(b"content-length", b"30")], 1, True),  # answered mid-body
        ([b"x" * 10] * 3, [(b"transfer-encoding", b"chunked")], 0, True),  # before a byte
        ([b"x" * 10] * 3, [(b"content-length", b"30")], 3, False),  # read to its end
        ([b""], [(b"content-length", b"0")], 0, False),  # no body to read
        ([b""], [], 0, False),
    ],
)
def test_an_answer_before_the_bodys_end_closes_the_connection(
    chunks: list[bytes], headers: list[tuple[bytes, bytes]], reads: int, closes: bool
) -> None:
    """uvicorn reads and drops the rest of a body the app did not read, to keep the connection,
    however long it goes on: the body cap counts only what the app reads."""
    status, response_headers, _, pulled = run(limited(EarlyAnswer(reads)), chunks, headers)
    assert (status, pulled) == (413, reads)
    assert response_headers.get(b"connection") == (b"close" if closes else b"keep-alive")
