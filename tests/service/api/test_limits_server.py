"""A real uvicorn against a 50 MB upload: refused with 413, memory flat, /healthz still answers.

The uploads go over raw sockets: an HTTP client would send the whole body before reading the
answer, and the point is that the server answers (and stops reading) long before the end.
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import api_process, service_env

KEY = "server-test-key-0123456789"
AUTH = f"Bearer {KEY}"
UPLOAD_BYTES = 50 * 1024 * 1024
CHUNK_BYTES = 64 * 1024
BOUNDARY = "fifty-megabytes"
MIB = 1024 * 1024
# Far below the 50 MB sent: what the server may grow by while refusing it (it reads up to
# the 16 MiB cap, spooling the upload to a temporary file past 1 MiB).
MAX_RSS_GROWTH_BYTES = 20 * MIB
HEALTH_DEADLINE_S = 10.0


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid``, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> Iterator[tuple[Any, httpx.Client]]:
    root = tmp_path_factory.mktemp("limits-server")
    (root / "mnist.db").write_bytes(sqlite_template.read_bytes())
    env = service_env(
        database_url=f"sqlite:///{root / 'mnist.db'}",
        checkpoint_dir=str(root / "models"),
        api_key=KEY,
    )
    log = root / "api.log"
    with api_process(env, log, headers={"Authorization": AUTH}) as (proc, client):
        yield proc, client
    # Refusing uploads is routine: nothing in the server's log may look like a failure.
    text = log.read_text()
    assert "Traceback" not in text and "unhandled error" not in text, text[-3000:]


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (it does, after a 413)."""
    sock.settimeout(30)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass  # data already received stays readable; a reset only ends it
    return data


def stream_upload(
    port: int, head: str, chunks: Iterator[bytes], on_progress: Any = None
) -> tuple[int, bytes, int]:
    """Send ``head`` then ``chunks`` until the server answers; (status, response, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop sending
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if on_progress is not None:
                on_progress(sent)
        response = read_response(sock)
    assert response, f"no answer after {sent} bytes"
    return int(response.split(b" ", 2)[1]), response, sent


def chunked_multipart(total: int) -> Iterator[bytes]:
    """A multipart body with one ``total``-byte file, in HTTP/1.1 chunked framing."""

    def framed(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    yield framed(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
    )
    block = b"\x89PNG" + b"\x00" * (CHUNK_BYTES - 4)
    for _ in range(total // CHUNK_BYTES):
        yield framed(block)
    yield framed(f"\r\n--{BOUNDARY}--\r\n".encode())
    yield b"0\r\n\r\n"


def port_of(client: httpx.Client) -> int:
    port = client.base_url.port
    assert port is not None
    return port


def test_a_50mb_chunked_upload_is_refused_with_memory_flat_and_health_answering(
    server: tuple[Any, httpx.Client],
) -> None:
    proc, client = server
    # Warm up the paths the upload takes (multipart parsing, Pillow) so they are not counted.
    warm = client.post("/predict", files={"file": ("d.png", png(), "image/png")})
    assert warm.status_code == 409  # no model yet: it got through the whole path
    baseline = rss_bytes(proc.pid)
    peak = baseline
    health: dict[str, Any] = {}

    def probe_health() -> None:
        started = time.monotonic()
        with httpx.Client(base_url=str(client.base_url), timeout=HEALTH_DEADLINE_S) as other:
            health["status"] = other.get("/healthz").status_code
        health["seconds"] = time.monotonic() - started

    prober = threading.Thread(target=probe_health)

    def on_progress(sent: int) -> None:
        nonlocal peak
        if sent % MIB < CHUNK_BYTES:
            peak = max(peak, rss_bytes(proc.pid))
        if sent >= 4 * MIB and not prober.is_alive() and "status" not in health:
            prober.start()  # while the upload is going on

    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {AUTH}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    status, response, sent = stream_upload(
        port_of(client), head, chunked_multipart(UPLOAD_BYTES), on_progress
    )
    prober.join(timeout=HEALTH_DEADLINE_S + 5)
    peak = max(peak, rss_bytes(proc.pid))

    assert status == 413, response[:500]
    assert b'"payload_too_large"' in response
    assert b"x-request-id" in response.lower()
    assert sent < UPLOAD_BYTES, "the server read the whole upload before answering"
    assert peak - baseline < MAX_RSS_GROWTH_BYTES, (
        f"RSS grew {(peak - baseline) / MIB:.1f} MiB for a {UPLOAD_BYTES // MIB} MB upload"
    )
    assert health.get("status") == 200, health
    print(
        f"\n50 MB upload: refused after {sent / MIB:.1f} MiB sent; RSS {baseline / MIB:.0f} MiB → "
        f"peak {peak / MIB:.0f} MiB; /healthz meanwhile in {health['seconds'] * 1000:.0f} ms"
    )
    # The server is fine afterwards.
    assert client.get("/jobs").status_code == 200


def test_a_declared_50mb_body_is_refused_before_it_is_sent(
    server: tuple[Any, httpx.Client],
) -> None:
    proc, client = server
    baseline = rss_bytes(proc.pid)
    head = (
        "POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {AUTH}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {UPLOAD_BYTES}\r\n\r\n"
    )
    status, response, sent = stream_upload(port_of(client), head, iter(()))
    assert (status, sent) == (413, 0)
    assert b"connection: close" in response.lower()
    assert rss_bytes(proc.pid) - baseline < MAX_RSS_GROWTH_BYTES


def test_the_real_server_wants_the_key(server: tuple[Any, httpx.Client]) -> None:
    _, client = server
    assert httpx.get(client.base_url.join("/jobs")).status_code == 401
    assert httpx.get(client.base_url.join("/healthz")).status_code == 200
    assert client.get("/jobs").status_code == 200
    assert "server" not in client.get("/healthz").headers  # uvicorn does not announce itself
