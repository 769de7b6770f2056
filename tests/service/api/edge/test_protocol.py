"""The HTTP edge of a real ``python -m service``: caps, deadlines and the server's own answers.

Two servers: one with the defaults (but its port and database), against 2,000 stalled
connections and a 16 MB header; one with small limits from the environment, for each answer
(431, 414, 408, 400, and 503 at the connection and event-stream caps). Raw sockets throughout:
an HTTP client would neither stall on purpose nor show what the server does on the wire.
"""

from __future__ import annotations

import json
import re
import resource
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.stalls import reap, stalled
from service.api.dashboard import PLOTLY_FILE, plotly_js
from service.api.edge.server import FD_HEADROOM, connection_cap
from service.settings import Settings
from tests.support import api_process, free_port, process, service_env, wait_for

STALLED = 2000
CLOSE_DEADLINE_S = 15.0
HEALTH_P95_S = 0.25
MIB = 1024 * 1024
SMALL = {
    "max_header_bytes": "4096",
    "max_request_line_bytes": "1024",
    "header_timeout_s": "1",
    "body_timeout_s": "1",
    "keepalive_timeout_s": "30",
    "send_timeout_s": "2",
    "max_connections": "6",
    "max_event_streams": "2",
}


def database(root: Path, template: Path) -> dict[str, str]:
    (root / "mnist.db").write_bytes(template.read_bytes())
    return {
        "database_url": f"sqlite:///{root / 'mnist.db'}",
        "checkpoint_dir": str(root / "models"),
    }


@pytest.fixture(scope="module")
def default_server(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> Iterator[tuple[Any, httpx.Client]]:
    root = tmp_path_factory.mktemp("edge-defaults")
    env = service_env(**database(root, sqlite_template), access_log="false")
    with api_process(env, root / "api.log") as (proc, client):
        yield proc, client


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[int]:
    """A server with small limits; its port. Nothing here keeps a connection open to it."""
    with small_limits("service", tmp_path_factory.mktemp("edge-small"), sqlite_template) as port:
        yield port


@contextmanager
def small_limits(module: str, root: Path, sqlite_template: Path) -> Iterator[int]:
    """``python -m <module>`` with small limits, until the generator is closed: its port."""
    port = free_port()
    env = service_env(**database(root, sqlite_template), **SMALL, port=str(port), host="127.0.0.1")
    log = root / "api.log"
    with process(["-m", module], env, log) as proc:

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s=60, what="the API to answer /healthz")
        yield port
    assert "Traceback" not in log.read_text()


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This process may open thousands of sockets (its soft limit raised to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < STALLED + 500:
        pytest.skip(f"the descriptor limit ({hard}) is too low for {STALLED} sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def exchange(port: int, data: bytes, *, timeout_s: float = 10.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes; what came back and how long it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def envelope(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    error: dict[str, Any] = json.loads(body)["error"]
    return error


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def test_the_connection_cap_fits_under_the_descriptor_limit() -> None:
    settings = Settings(max_connections=5000)
    assert connection_cap(settings, 1024) == 1024 - FD_HEADROOM
    assert connection_cap(settings, 100_000) == 5000
    assert connection_cap(settings, resource.RLIM_INFINITY) == 5000


# --- the defaults, against stalled connections and a huge header ------------------------------


def health_latencies(base_url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while not stop.is_set():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            out.append(time.monotonic() - started)
            stop.wait(0.02)


def test_stalled_connections_are_closed_while_health_answers(
    default_server: tuple[Any, httpx.Client], many_descriptors: None
) -> None:
    _, client = default_server
    port = client.base_url.port
    assert port is not None
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=health_latencies, args=(str(client.base_url), stop, latencies))
    started = time.monotonic()
    prober.start()
    try:
        with stalled(port, STALLED) as selector:
            opened_s = time.monotonic() - started
            closed: list[float] = []
            deadline = started + CLOSE_DEADLINE_S
            while selector.get_map() and time.monotonic() < deadline:
                closed += [time.monotonic() - started] * reap(selector, 0.1)
    finally:
        stop.set()
        prober.join(timeout=15)
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(
        f"\n{STALLED} stalled: opened in {opened_s:.1f} s, {len(closed)} closed by the server "
        f"within {CLOSE_DEADLINE_S:g} s (median at {statistics.median(closed or [0]):.1f} s); "
        f"/healthz meanwhile p95 {p95 * 1000:.0f} ms over {len(latencies)} requests"
    )
    assert len(closed) >= 0.95 * STALLED
    assert len(latencies) >= 20
    assert p95 <= HEALTH_P95_S
    assert client.get("/healthz").status_code == 200


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def test_a_16mb_header_is_refused_at_once_with_memory_flat(
    default_server: tuple[Any, httpx.Client],
) -> None:
    proc, client = default_server
    port = client.base_url.port
    assert port is not None
    before = memory_kib(proc.pid)
    peak = [before["VmRSS"]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak.append(memory_kib(proc.pid)["VmRSS"])

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        huge = get("/healthz", "X-Huge: " + "a" * (16 * MIB))
        response, seconds = exchange(port, huge)
    finally:
        done.set()
        sampler.join()
    after = memory_kib(proc.pid)
    grown_kib = max(max(peak) - before["VmRSS"], after["VmHWM"] - before["VmHWM"])
    print(f"\n16 MB header: {response[:40]!r} in {seconds * 1000:.0f} ms, RSS +{grown_kib} KiB")
    assert seconds < 2.0
    assert response == b"" or status_of(response) == 431
    assert grown_kib < 100 * 1024
    assert client.get("/healthz").status_code == 200


# --- small limits, one answer each ------------------------------------------------------------


def test_a_large_header_block_gets_431(small_server: int) -> None:
    response, _ = exchange(small_server, get("/healthz", "X-Big: " + "b" * 5000))
    assert status_of(response) == 431
    assert envelope(response)["code"] == "header_too_large"
    assert b"connection: close" in response.lower()


def test_the_benchmarks_baseline_serves_without_the_edge(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """``benchmarks.plain_uvicorn``, what the edge is measured against, runs the service on
    uvicorn's own protocol: the header block the edge refuses reaches the app."""
    with small_limits("benchmarks.plain_uvicorn", tmp_path, sqlite_template) as port:
        response, _ = exchange(port, get("/healthz", "X-Big: " + "b" * 5000, "Connection: close"))
    assert status_of(response) == 200
    assert b"\r\ndate: " in response.lower()  # the quiet server leaves it to the protocol


def test_a_long_request_line_gets_414(small_server: int) -> None:
    response, _ = exchange(small_server, get("/healthz?q=" + "q" * 2000))
    assert status_of(response) == 414
    assert envelope(response)["code"] == "uri_too_long"


def test_headers_just_under_the_caps_are_served(small_server: int) -> None:
    line = "/healthz?q=" + "q" * 900
    response, _ = exchange(small_server, get(line, "X-Big: " + "b" * 2500, "Connection: close"))
    assert status_of(response) == 422  # the app's own answer (no such parameter): it got through
    assert "unknown query parameter" in envelope(response)["message"]


def test_headers_that_stall_get_408_after_the_header_timeout(small_server: int) -> None:
    response, seconds = exchange(small_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert status_of(response) == 408
    assert envelope(response)["code"] == "request_timeout"
    assert 0.9 <= seconds < 5


def test_a_body_that_stalls_gets_408_after_the_body_timeout(small_server: int) -> None:
    head = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    response, seconds = exchange(small_server, head + b'Content-Length: 50\r\n\r\n{"epochs"')
    assert status_of(response) == 408
    assert envelope(response)["code"] == "request_timeout"
    assert 0.9 <= seconds < 5


def test_a_body_that_drips_gets_408_once_it_falls_behind_the_least_pace(small_server: int) -> None:
    """A byte every 0.3 s is never silent for the body timeout (1 s here): it held its
    connection, and its place under the cap, until its 1,000 bytes were in (5 minutes)."""
    head = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", small_server), timeout=0.3) as sock:
        sock.sendall(head + b"Content-Length: 1000\r\n\r\n")
        response = b""
        for _ in range(40):  # 12 s of drips at most
            sock.sendall(b" ")
            try:
                if chunk := sock.recv(65536):
                    response += chunk
                    break
            except TimeoutError:
                continue
    assert status_of(response) == 408, response
    assert envelope(response)["message"] == "the request body came slower than 500 bytes/s"


def test_a_silent_connection_is_closed_after_the_header_timeout(small_server: int) -> None:
    response, seconds = exchange(small_server, b"")
    assert response == b""
    assert 0.9 <= seconds < 5


def test_a_malformed_request_gets_400_in_the_envelope(small_server: int) -> None:
    response, _ = exchange(small_server, b"NOT HTTP AT ALL\r\n\r\n")
    assert status_of(response) == 400
    assert envelope(response)["code"] == "bad_request"


def test_a_request_without_its_one_host_gets_400(small_server: int) -> None:
    """RFC 9112, section 3.2: an HTTP/1.1 request names one Host, any request at most one; on a
    kept-alive connection, after the answers owed before it."""
    refused = [
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    ]
    for data in refused:
        response, _ = exchange(small_server, data)
        assert status_of(response) == 400, (data, response)
        assert "Host" in envelope(response)["message"]
    response, _ = exchange(small_server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200, response
    response, _ = exchange(small_server, get("/healthz") + refused[0])
    first, _, second = response.partition(b"HTTP/1.1 400 ")
    assert status_of(first) == 200 and second, response


def test_a_websocket_handshake_is_answered_as_the_plain_request_it_also_is(
    small_server: int,
) -> None:
    """No WebSocket routes: the handshake is a GET the app answers (uvicorn refused it with a
    bare 403 of its own, before the app or its envelope)."""
    upgrade = ["Upgrade: websocket", "Connection: Upgrade, close", "Sec-WebSocket-Version: 13"]
    handshake = get("/no-such-path", *upgrade, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    response, _ = exchange(small_server, handshake)
    assert status_of(response) == 404, response
    assert envelope(response)["code"] == "http_404"
    response, _ = exchange(small_server, get("/healthz", *upgrade))
    assert status_of(response) == 200, response
    # A request pipelined behind a handshake (in the same read) is answered too.
    kept = ["Upgrade: websocket", "Connection: Upgrade"]
    both, _ = exchange(
        small_server, get("/no-such-path", *kept) + get("/healthz", "Connection: close")
    )
    first, _, second = both.partition(b"HTTP/1.1 200 ")
    assert status_of(first) == 404 and second, both


def posted_job(version: str, *headers: str) -> bytes:
    """``POST /jobs`` of ``{}`` in one chunk, with ``headers`` (a ``Transfer-Encoding``)."""
    head = [f"POST /jobs HTTP/{version}", "Host: x", "Content-Type: application/json", *headers]
    return "\r\n".join([*head, "", "2", "{}", "0", "", ""]).encode()


def test_a_transfer_coding_but_chunked_gets_501_and_none_in_http_10_400(
    small_server: int,
) -> None:
    """llhttp reads ``gzip, chunked`` as chunked, and the app would take the compressed body
    for the plain one (RFC 9112, section 6.1: 501); an HTTP/1.0 message with a transfer coding
    has faulty framing (400). Nothing is created."""
    url = f"http://127.0.0.1:{small_server}/jobs"
    before = httpx.get(url).json()
    for codings in (["gzip, chunked"], ["br", "chunked"]):
        headers = [f"Transfer-Encoding: {coding}" for coding in codings]
        response, _ = exchange(small_server, posted_job("1.1", *headers))
        assert status_of(response) == 501, (codings, response)
        assert envelope(response)["code"] == "not_implemented"
    response, _ = exchange(small_server, posted_job("1.0", "Transfer-Encoding: chunked"))
    assert status_of(response) == 400, response
    assert "Transfer-Encoding" in envelope(response)["message"]
    assert httpx.get(url).json() == before
    # chunked alone is read as ever
    chunked = posted_job("1.1", "Transfer-Encoding: chunked", "Connection: close")
    response, _ = exchange(small_server, chunked)
    assert status_of(response) == 202, response
    created = json.loads(response.partition(b"\r\n\r\n")[2])["id"]
    assert httpx.post(f"{url}/{created}/cancel").status_code == 200


def test_a_method_the_parser_does_not_know_gets_501(small_server: int) -> None:
    """RFC 9110, section 9.1: 501 for a method not implemented; bytes that are no request line
    (a TLS handshake to the plain port) stay a 400, and a method llhttp knows but no route
    takes is the app's 405."""
    for method in (b"FOO", b"get", b"BREW", b"DESCRIBE"):  # the last RTSP's, known to llhttp
        response, _ = exchange(small_server, method + b" /jobs HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 501, (method, response)
        assert (
            envelope(response)["message"]
            == f"the method {method.decode()!r} is not implemented here"
        )
    tls_hello = bytes.fromhex("160301020001000001fc0303") + bytes(32)
    response, _ = exchange(small_server, tls_hello)
    assert status_of(response) == 400 and envelope(response)["code"] == "bad_request", response
    response, _ = exchange(small_server, b"PROPFIND /jobs HTTP/1.0\r\n\r\n")
    assert status_of(response) == 405, response
    # A read cut at the header cap (4096 bytes here) inside the next request's method: where
    # that request began is not known, and it is not named by the method's tail ('TX').
    first = get("/healthz", "X-Pad: " + "a" * 4000)
    first = get("/healthz", "X-Pad: " + "a" * (4000 + 4094 - len(first)))
    assert len(first) == 4094
    response, _ = exchange(small_server, first + b"GETX /jobs HTTP/1.1\r\nHost: x\r\n\r\n")
    second = response.partition(b"HTTP/1.1 200 OK")[2].partition(b"HTTP/1.1 ")[2]
    assert statuses(response)[0] == 200 and b"'TX'" not in response, response
    assert second.startswith(b"400 ") or b"'GETX'" in second, response  # a read of its own


def test_http_09_is_not_served(small_server: int) -> None:
    """llhttp takes an ``HTTP/0.9`` request line with headers, which neither 1.0's rules (no
    transfer coding, an answer framed by the close) nor 1.1's govern: 505, nothing done."""
    url = f"http://127.0.0.1:{small_server}/jobs"
    before = httpx.get(url).json()
    smuggled = posted_job("0.9", "Connection: keep-alive", "Transfer-Encoding: chunked")
    response, _ = exchange(small_server, smuggled + get("/healthz"))
    assert statuses(response) == [505], response
    assert envelope(response)["code"] == "version_not_supported"
    assert httpx.get(url).json() == before


def dechunked(body: bytes) -> bytes:
    """A chunked body's content, to its last chunk (which must be there)."""
    content = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        if int(size, 16) == 0:
            assert body == b"\r\n", body
            return content
        content, body = content + body[: int(size, 16)], body[int(size, 16) + 2 :]


def test_an_event_stream_to_an_http_10_client_ends_with_the_connection(
    small_server: int,
) -> None:
    """RFC 9112, section 6.1: no chunked answer to an HTTP/1.0 client (uvicorn chunked it); an
    answer of no length ends with the connection (section 6.3). The same events as HTTP/1.1's,
    a stream that ends (a canceled job's) and one that goes on (a queued job's) alike."""
    url = f"http://127.0.0.1:{small_server}/jobs"
    ended = httpx.post(url, json={"epochs": 1}).json()["id"]
    assert httpx.post(f"{url}/{ended}/cancel").status_code == 200
    events = f"/jobs/{ended}/events"
    old, _ = exchange(small_server, f"GET {events} HTTP/1.0\r\n\r\n".encode())
    new, _ = exchange(small_server, get(events, "Connection: close"))
    old_head, _, old_body = old.partition(b"\r\n\r\n")
    new_head, _, new_body = new.partition(b"\r\n\r\n")
    assert status_of(old) == status_of(new) == 200, (old, new)
    assert (
        b"transfer-encoding" not in old_head.lower() and b"content-length" not in old_head.lower()
    )
    assert b"transfer-encoding: chunked" in new_head.lower(), new_head
    assert old_body == dechunked(new_body) and b'"status":"cancelled"' in old_body, old_body

    queued = httpx.post(url, json={"epochs": 1}).json()["id"]  # no worker: it goes on
    with socket.create_connection(("127.0.0.1", small_server), timeout=10) as sock:
        sock.sendall(f"GET /jobs/{queued}/events HTTP/1.0\r\n\r\n".encode())
        received = b""
        while b"\n\n" not in received.partition(b"\r\n\r\n")[2]:
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower(), head
        assert body.startswith(b"event: status\ndata: {"), body
    assert httpx.post(f"{url}/{queued}/cancel").status_code == 200


def test_a_head_on_a_kept_alive_connection_sends_no_body(small_server: int) -> None:
    """The GET's headers (its Content-Length too), not a byte of its body: the next answer on
    the connection starts right after them."""
    got, _ = exchange(small_server, get("/jobs", "Connection: close"))
    head = b"HEAD /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answered, _ = exchange(small_server, head + get("/healthz", "Connection: close"))
    first, _, rest = answered.partition(b"\r\n\r\n")
    assert status_of(first) == 200 and rest.startswith(b"HTTP/1.1 200 "), answered
    length = re.search(rb"content-length: (\d+)", first.lower())
    assert length is not None and length.group(0) in got.lower(), (first, got)


def kept_open(port: int) -> socket.socket | None:
    """A connection that has been answered 200 and stays open; None if refused (503)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(get("/healthz"))
    response = sock.recv(65536)
    if status_of(response) == 200:
        return sock
    sock.close()
    return None


def test_connections_beyond_the_cap_get_503_with_retry_after(small_server: int) -> None:
    held: list[socket.socket] = []
    try:
        # Connections of earlier tests may still be closing: fill the cap as they go.
        for _ in range(int(SMALL["max_connections"])):
            held.append(wait_for(lambda: kept_open(small_server), timeout_s=10, what="a slot"))
        response, _ = exchange(small_server, get("/healthz"))
        assert status_of(response) == 503
        assert b"retry-after: 1" in response.lower()
        assert envelope(response)["code"] == "at_capacity"
        held.pop().close()
        wait_for(lambda: kept_open(small_server), timeout_s=10, what="the freed slot").close()
    finally:
        for sock in held:
            sock.close()


def open_stream(port: int, job_id: str) -> tuple[socket.socket, bytes]:
    """A GET of the job's events; the socket and the answer's head (and body, if it has a
    length: a refusal's envelope)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(get(f"/jobs/{job_id}/events", "Accept: text/event-stream"))
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            while len(body) < int(line.split(b":")[1]):
                body += sock.recv(65536)
    return sock, head + b"\r\n\r\n" + body


def test_event_streams_beyond_the_cap_get_503_until_one_closes(small_server: int) -> None:
    job = httpx.post(f"http://127.0.0.1:{small_server}/jobs", json={"epochs": 1})
    assert job.status_code == 202
    job_id = job.json()["id"]  # queued, with no worker: its stream stays open
    streams: list[socket.socket] = []
    try:
        for _ in range(int(SMALL["max_event_streams"])):
            sock, first = open_stream(small_server, job_id)
            streams.append(sock)
            assert status_of(first) == 200, first
        sock, refused = open_stream(small_server, job_id)
        sock.close()
        assert status_of(refused) == 503
        assert b"retry-after: 5" in refused.lower()
        assert envelope(refused)["code"] == "at_capacity"
        streams.pop().close()

        def accepted() -> bool:
            sock, first = open_stream(small_server, job_id)
            streams.append(sock)
            return status_of(first) == 200

        wait_for(accepted, timeout_s=10, what="a stream once one has closed", every_s=0.1)
    finally:
        for sock in streams:
            sock.close()


def half_closed(port: int, data: bytes, *, timeout_s: float = 10.0) -> bytes:
    """Send ``data``, shut down the sending side (a half-close), read until the server
    closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def statuses(received: bytes) -> list[int]:
    """The status of each answer in ``received``, in order (no body here holds a status line)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


def test_a_half_closed_connection_is_answered_what_it_asked(small_server: int) -> None:
    # The app's requests (not the quick answers), pipelined: a half-close is no disconnect.
    asked = get("/jobs?limit=1") + get("/healthz") + get("/jobs?limit=2")
    assert statuses(half_closed(small_server, asked)) == [200, 200, 200]
    assert statuses(half_closed(small_server, get("/jobs?limit=1"))) == [200]
    # A refusal that waits for the answers before it still comes, after them.
    assert statuses(half_closed(small_server, get("/jobs?limit=1") + b"GARBAGE\r\n\r\n")) == [
        200,
        400,
    ]


def test_a_request_cut_short_by_a_half_close_is_answered_nothing(small_server: int) -> None:
    before = httpx.get(f"http://127.0.0.1:{small_server}/jobs").json()
    assert half_closed(small_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") == b""
    head = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    assert half_closed(small_server, head + b'Content-Length: 50\r\n\r\n{"epochs"') == b""
    # Behind a whole request, which is answered.
    cut = get("/jobs?limit=1") + head + b'Content-Length: 50\r\n\r\n{"epochs"'
    assert statuses(half_closed(small_server, cut)) == [200]
    assert httpx.get(f"http://127.0.0.1:{small_server}/jobs").json() == before  # none created


def test_an_event_stream_ends_when_its_client_half_closes(small_server: int) -> None:
    """As a browser closing it: nothing tells that from a half-close, and a stream kept would
    hold its place among the capped ones until a write found its client gone (the socket is
    no longer read). So whether the end of data comes before the stream begins or after; the
    places are let go well before a keep-alive write (15 s) would find the clients gone."""
    url = f"http://127.0.0.1:{small_server}"
    job_id = httpx.post(f"{url}/jobs", json={"epochs": 1}).json()["id"]  # queued: no worker

    def placed() -> socket.socket | None:
        sock, first = open_stream(small_server, job_id)
        if status_of(first) == 200:
            return sock
        sock.close()  # 503: the places of the streams before are being let go
        return None

    for _ in range(int(SMALL["max_event_streams"]) + 1):
        half_closed(small_server, get(f"/jobs/{job_id}/events"))  # returns at the server's close
        with wait_for(placed, timeout_s=5, what="a place for a stream") as sock:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # the opening event, and then the server's close
                pass
    wait_for(placed, timeout_s=5, what="a place for a stream").close()
    assert httpx.post(f"{url}/jobs/{job_id}/cancel").status_code == 200


def large_answer(port: int) -> socket.socket:
    """A connection that asked for about 4.8 MB, whose client's receive buffer holds 4 KiB."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server must wait on us
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(get(f"/static/vendor/{PLOTLY_FILE}"))
    return sock


def read_answer(sock: socket.socket, received: bytes = b"") -> tuple[int, int]:
    """The rest of one answer, to its end or the connection's: its body's length, and the
    length its head announced."""
    while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    length = re.search(rb"content-length: (\d+)", head.lower())
    assert length is not None
    while len(body) < int(length[1]) and (chunk := sock.recv(65536)):
        body += chunk
    return len(body), int(length[1])


def test_an_answer_under_way_is_written_whole_after_a_half_close(small_server: int) -> None:
    with large_answer(small_server) as sock:
        received = sock.recv(65536)  # the answer has begun
        sock.shutdown(socket.SHUT_WR)
        body, announced = read_answer(sock, received)
    assert body == announced > 4_000_000


def was_reset(sock: socket.socket) -> bool:
    """Whether the connection ends in a reset, once read to its end."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    return False


def test_clients_that_take_none_of_their_answers_are_let_go(small_server: int) -> None:
    """uvicorn has no send deadline: as many clients as the connection cap, each asking for
    a large answer and taking none of it, held every connection of the server for good, and
    every other client got 503 (measured on main: for as long as they stayed)."""
    most_queued = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    if most_queued >= plotly_js().stat().st_size:  # the kernel could take it all: none waits
        pytest.skip(f"a socket's send queue here may hold {most_queued} bytes")
    cap = int(SMALL["max_connections"])
    stalled = [large_answer(small_server) for _ in range(cap)]
    held: list[socket.socket] = []
    try:
        # Every place of the cap served again: the stalled clients have been let go, all of
        # them (taking some of an answer now would put off its deadline).
        for _ in range(cap):
            held.append(wait_for(lambda: kept_open(small_server), timeout_s=30, what="a place"))
        for sock in stalled:  # reset: what the kernels held is dropped with the connection
            assert was_reset(sock)
    finally:
        for sock in stalled + held:
            sock.close()


def test_a_client_that_takes_its_answer_slowly_gets_it_whole(small_server: int) -> None:
    """The send deadline runs from the last time the client took some of its answer, not
    from when the server's writes first had to wait: a slow reader is no stalled one."""
    deadline_s = float(SMALL["send_timeout_s"])
    with large_answer(small_server) as sock:
        received = b""
        slow_until = time.monotonic() + 3 * deadline_s
        while time.monotonic() < slow_until:  # a little every tenth of the deadline
            received += sock.recv(2048)
            time.sleep(deadline_s / 10)
        body, announced = read_answer(sock, received)
    assert body == announced > 4_000_000


def test_a_stream_is_let_go_when_its_client_resets_with_a_request_behind_it(
    small_server: int,
) -> None:
    """uvicorn tells only the latest request read that the client has gone: a request
    pipelined behind a stream left the stream holding its place, until the cap refused every
    stream more."""
    url = f"http://127.0.0.1:{small_server}"
    job_id = httpx.post(f"{url}/jobs", json={"epochs": 1}).json()["id"]  # queued: no worker

    def stream_with_a_request_behind() -> socket.socket | None:
        """A stream that opened (its first event read), a request pipelined behind it; None
        where the cap refused it (the places of the streams reset before are let go as the
        server reads the resets)."""
        sock = socket.create_connection(("127.0.0.1", small_server), timeout=10)
        sock.sendall(get(f"/jobs/{job_id}/events") + get("/healthz"))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        if status_of(received) != 200:
            sock.close()
            return None
        while b"\nid: " not in received:
            received += sock.recv(65536)
        return sock

    for _ in range(int(SMALL["max_event_streams"]) + 2):
        sock = wait_for(stream_with_a_request_behind, timeout_s=10, what="a place for a stream")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
    assert httpx.post(f"{url}/jobs/{job_id}/cancel").status_code == 200
