"""The edge's refusals, counted in /metrics and logged, against a real server."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from tests.support import api_process, service_env


def refused(port: int, request: bytes) -> int:
    """The status the server answers ``request`` with, on a connection of its own."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = conn.recv(65536)
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert found is not None, answer[:200]
    return int(found[1])


def test_what_the_edge_refuses_is_counted_and_logged(sqlite_url: str, tmp_path: Path) -> None:
    """None of them reached the app, so neither its metrics nor its log had them: a flood of
    bad requests, or the connection cap reached, showed nowhere."""
    env = service_env(database_url=sqlite_url, checkpoint_dir=str(tmp_path / "models"))
    log = tmp_path / "api.log"
    with api_process(env, log) as (_proc, client):
        port = client.base_url.port
        assert port is not None
        assert refused(port, b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n") == 501
        assert refused(port, b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n") == 431
        assert refused(port, b"\x16\x03\x01 not http\r\n\r\n") == 400
        text = client.get("/metrics").text
    for status in (501, 431, 400):
        sample = f'mnist_http_requests_total{{method="other",route="<edge>",status="{status}"}} 1.0'
        assert sample in text, status
    logged = log.read_text()
    assert "refused ('127.0.0.1', " in logged and ": 431 the request's header block" in logged
