"""Bodies the app does not read to their end, on a real server: an upload refused by a route's own
cap ends its connection, and a client that leaves mid-upload is no server fault."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import api_server, service_env, wait_for

UPLOAD_CAP = 1024  # MNIST_MAX_UPLOAD_BYTES: predict's own cap per image, far below the body cap
CHUNK = b"x" * 65536
FRAME = b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
ENOUGH = 256 * 2**20  # more than a server that reads to the end would let through in the test


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    env = service_env(
        database_url=sqlite_url,
        checkpoint_dir=str(tmp_path / "models"),
        max_upload_bytes=str(UPLOAD_CAP),
        allow_no_auth="true",
    )
    with api_server(env, tmp_path / "api.log") as client:
        yield client


def connect(client: httpx.Client) -> socket.socket:
    url = client.base_url
    assert url.host and url.port
    return socket.create_connection((url.host, url.port), timeout=30)


def test_an_upload_refused_by_the_routes_cap_ends_its_connection(api: httpx.Client) -> None:
    """The route's 413 came at 1 KiB, and uvicorn then read and dropped 2 GiB more to keep the
    connection, at the server's CPU, past the body cap (16 MiB), which counts what the app reads."""
    conn = connect(api)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
    sent, answer = 0, b""
    with conn:
        try:
            while sent < ENOUGH:
                conn.sendall(FRAME)
                sent += len(FRAME)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed it: what it must do
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: a reset, which may come before the answer
    assert sent < ENOUGH, "the server read the whole upload: the connection stayed open"
    if answer:  # when it came before the reset
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert re.search(rb"\r\nconnection: close\r\n", answer, re.IGNORECASE)


def _count(scrape: str, status: str) -> float:
    """Requests to predict answered ``status``, as the scrape counts them."""
    total = 0.0
    for labels, value in re.findall(r"^mnist_http_requests_total\{(.*)\} (\S+)$", scrape, re.M):
        if 'route="/predict"' in labels and f'status="{status}"' in labels:
            total += float(value)
    return total


def test_a_client_that_leaves_mid_upload_is_counted_as_a_bad_request_not_a_500(
    api: httpx.Client, tmp_path: Path
) -> None:
    """Starlette raises ClientDisconnect from the body's stream: predict let it through, a 500
    with two tracebacks in the log, each time, for whoever sent half a body."""
    for kind in ("image/png", "application/json"):
        with connect(api) as conn:
            head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
            conn.sendall(head.encode() + b"Content-Length: 900\r\n\r\n" + b"x" * 100)
    wait_for(
        lambda: _count(api.get("/metrics").text, "400") == 2,
        timeout_s=30,
        what="both requests to be counted",
    )
    scrape = api.get("/metrics").text
    assert _count(scrape, "500") == 0
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
