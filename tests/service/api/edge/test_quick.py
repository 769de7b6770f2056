"""The edge protocol's quick answers are the app's own: the same raw requests, on real sockets,
to servers of one app with and without them, give the same bytes, the same metrics, and the
quick ones are exactly the polls every layer lets pass.

Both servers are uvicorn with the edge protocol (uvloop, uvicorn's proxy headers in front), in
threads of this process, on one SQLite database; the reference has the fast lanes too (its
polls are answered by the ASGI lane), and a third server without the lanes (the routes answer
every request) must give the same bytes as well, to the order of the headers.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.app import create_app
from service.api.edge import quick
from service.api.edge.protocol import EdgeProtocol
from service.api.edge.quick import QuickAnswers
from service.schemas import JobCreate
from service.status import JobStatus
from tests.records import FakeTraining
from tests.support import app_settings, free_port, wait_for

FULL_KEY = "quick-full-" + "f" * 21
READ_KEY = "quick-read-" + "r" * 21
UNKNOWN = "0123456789abcdef0123456789abcdef"
PARAMS = JobCreate(epochs=2, batch_size=2, trainset_size=600, testset_size=10)
DATE = re.compile(rb"\r\ndate: [^\r]*")
GENERATED_ID = re.compile(rb"\r\nx-request-id: [0-9a-f]{32}\r\n")


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes  # one request, or several pipelined
    quick: int  # how many of its requests the protocol answers itself
    keyed: bool = False


def get(
    path: str, *headers: str, version: str = "1.1", rid: str = "r1", close: bool = True
) -> bytes:
    """A GET's bytes; ``close`` asks the server to close after its answer, so that the reader
    knows where the answers end."""
    lines = [f"GET {path} HTTP/{version}", "Host: test", f"X-Request-ID: {rid}", *headers]
    if close and version == "1.1":
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def corpus(done: str, live: str, queued: str) -> list[Case]:
    bearer, reader = f"Authorization: Bearer {FULL_KEY}", f"Authorization: Bearer {READ_KEY}"
    return [
        Case("job: done", get(f"/jobs/{done}"), 1),
        Case("job: live", get(f"/jobs/{live}"), 1),
        Case("job: queued", get(f"/jobs/{queued}"), 1),
        Case("job: unknown", get(f"/jobs/{UNKNOWN}"), 0),
        Case("job: a query", get(f"/jobs/{done}?x=1"), 0),
        Case("job: a bad id", get("/jobs/ABC"), 0),
        Case("job: encoded", get(f"/jobs/%{ord(done[0]):02x}{done[1:]}"), 1),
        Case("metrics: plain", get(f"/jobs/{live}/metrics"), 1),
        Case("metrics: after", get(f"/jobs/{done}/metrics?after_step=290"), 1),
        Case("metrics: live", get(f"/jobs/{live}/metrics?after_step=1&limit=2"), 1),
        Case("metrics: at the end", get(f"/jobs/{done}/metrics?after_step=300"), 1),
        Case("metrics: larger than the loop", get(f"/jobs/{done}/metrics"), 0),
        Case("metrics: a large limit", get(f"/jobs/{done}/metrics?limit=300&after_step=10"), 0),
        Case("metrics: limit 0", get(f"/jobs/{done}/metrics?limit=0"), 0),
        Case("metrics: twice", get(f"/jobs/{done}/metrics?after_step=1&after_step=2"), 0),
        Case("metrics: unknown name", get(f"/jobs/{done}/metrics?step=1"), 0),
        Case("metrics: a key in the query", get(f"/jobs/{done}/metrics?access_token=k"), 0),
        Case("metrics: unknown job", get(f"/jobs/{UNKNOWN}/metrics"), 0),
        Case("metrics: HTTP/1.0", get(f"/jobs/{done}/metrics?after_step=299", version="1.0"), 1),
        Case(
            "metrics: keep-alive asked",
            get(f"/jobs/{done}/metrics?after_step=299", "Connection: keep-alive"),
            1,
        ),
        Case(
            "metrics: no request id",
            get(f"/jobs/{done}/metrics?after_step=299", rid="not a token!"),
            1,
        ),
        Case(
            "metrics: behind a proxy",
            get(
                f"/jobs/{done}/metrics?after_step=299",
                "X-Forwarded-For: 10.1.2.3",
                "X-Forwarded-Proto: https",
            ),
            1,
        ),
        Case(
            "metrics: a body",
            get(f"/jobs/{done}/metrics", "Content-Length: 5")[:-2] + b"\r\nhello",
            0,
        ),
        Case(
            "metrics: a chunked body",
            get(f"/jobs/{done}/metrics", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n",
            0,
        ),
        Case(
            "metrics: a form's header the limits refuse",
            get(
                f"/jobs/{live}/metrics", "Content-Type: multipart/form-data; boundary=" + "b" * 300
            ),
            0,
        ),
        Case("metrics: HEAD", get(f"/jobs/{done}/metrics").replace(b"GET", b"HEAD", 1), 0),
        Case(
            "pipelined: three polls",
            get(f"/jobs/{done}", rid="p1", close=False)
            + get(f"/jobs/{live}/metrics", rid="p2", close=False)
            + get(f"/jobs/{queued}", rid="p3"),
            3,
        ),
        Case(
            "pipelined: a refusal, then a poll",
            b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{]" + get(f"/jobs/{done}", rid="p2"),
            1,
        ),
        Case(
            "pipelined: a poll, then bytes the parser refuses",
            get(f"/jobs/{done}", rid="p1", close=False) + b"GARBAGE\r\n\r\n",
            1,
        ),
        Case(
            "pipelined: the app's request and a poll, then bytes the parser refuses",
            get("/jobs?limit=2", rid="p1", close=False)
            + get(f"/jobs/{live}", rid="p2", close=False)
            + b"GARBAGE\r\n\r\n",
            1,  # the poll waits for the app's answer, then is answered quickly
        ),
        Case("key: full", get(f"/jobs/{done}/metrics?after_step=299", bearer), 1, keyed=True),
        Case("key: read-only", get(f"/jobs/{done}", reader), 1, keyed=True),
        Case("key: none", get(f"/jobs/{done}/metrics"), 0, keyed=True),
        Case("key: wrong", get(f"/jobs/{done}", "Authorization: Bearer nope"), 0, keyed=True),
        Case(
            "key: in the query",
            get(f"/jobs/{done}/metrics?access_token={FULL_KEY}"),
            0,
            keyed=True,
        ),
    ]


def exchange(port: int, raw: bytes, *, window: int | None = None) -> bytes:
    """Send ``raw`` and read until the server closes (each case's last request asks it to);
    ``window``: the client's receive buffer, so that answers it has not read soon fill the
    server's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if window is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(raw)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def normal(response: bytes) -> bytes:
    """The bytes with what differs by the moment blanked: the Date, a generated request id."""
    return GENERATED_ID.sub(b"\r\nx-request-id: <new>\r\n", DATE.sub(b"\r\ndate: <now>", response))


@contextmanager
def serving(app: Any, **config_options: Any) -> Iterator[int]:
    """``app`` behind uvicorn and the edge protocol, as ``python -m service`` serves it."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=EdgeProtocol,
        log_config=None,
        access_log=True,
        **config_options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"quick-test-{port}", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout_s=60, what="the test server to start")
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


Servers = dict[tuple[bool, bool], tuple[int, Any]]  # (keyed, quick) → (port, app)


@pytest.fixture
def servers(db_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[Servers]:
    keys = {"api_key": FULL_KEY, "readonly_api_key": READ_KEY}
    with ExitStack() as stack:
        found: Servers = {}
        for keyed in (False, True):
            settings = app_settings(
                db_url, tmp_path, data_dir=small_mnist, **(keys if keyed else {})
            )
            for quick_on in (True, False):
                app = create_app(settings)
                if not quick_on:
                    app.quick = None  # type: ignore[attr-defined]
                found[keyed, quick_on] = stack.enter_context(serving(app)), app
        yield found


class Counted:
    """Counts the requests :class:`QuickAnswers` answers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        answer = QuickAnswers.answer

        def counted(quick_answers: QuickAnswers, *args: Any) -> bool:
            given = answer(quick_answers, *args)
            self.count += given
            return given

        monkeypatch.setattr(QuickAnswers, "answer", counted)


def jobs(sessions: sessionmaker[Session]) -> tuple[str, str, str]:
    """A job done (300 steps: more than the loop reads), one running, one queued."""
    done = FakeTraining(sessions, PARAMS)
    done.submit()
    done.claim()
    done.advance(150, end_epoch=0.5)
    done.advance(150, end_epoch=0.75)
    done.finish(JobStatus.SUCCEEDED)
    live = FakeTraining(sessions, PARAMS)
    live.submit()
    live.claim()
    live.advance(3)
    queued = FakeTraining(sessions, PARAMS)
    queued.submit()
    return done.job_id, live.job_id, queued.job_id


def request_counts(port: int) -> list[bytes]:
    """The request counters of the job polls' routes, from the server's ``/metrics``."""
    scrape = exchange(port, get("/metrics"))
    return sorted(
        line
        for line in scrape.splitlines()
        if line.startswith(b"mnist_http_requests_total") and b"/jobs/{job_id}" in line
    )


@pytest.fixture
def routes_port(db_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[int]:
    """A server of the app without its fast lanes (``MNIST_FAST_LANES=false``), no keys."""
    settings = app_settings(db_url, tmp_path, data_dir=small_mnist, fast_lanes=False)
    with serving(create_app(settings)) as port:
        yield port


def test_quick_answers_are_the_apps_own(
    servers: Servers,
    routes_port: int,
    db_url: str,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    done, live, queued = jobs(sessions)
    counted = Counted(monkeypatch)
    on_loop = db_url.startswith("sqlite")  # elsewhere polls read in threads: never quick
    differences, wrong_path = [], []
    cases = corpus(done, live, queued)
    assert len({case.name for case in cases}) == len(cases)
    for case in cases:
        before = counted.count
        with_quick = exchange(servers[case.keyed, True][0], case.raw)
        expected = case.quick if on_loop else 0
        if counted.count - before != expected:
            wrong_path.append(f"{case.name}: {counted.count - before} quick, not {expected}")
        answered = counted.count
        without = exchange(servers[case.keyed, False][0], case.raw)
        assert counted.count == answered  # the reference answers every request the ASGI way
        if normal(with_quick) != normal(without):
            differences.append(
                f"{case.name}:\n  quick {with_quick!r:.400}\n  app   {without!r:.400}"
            )
        routes = None if case.keyed else exchange(routes_port, case.raw)
        if routes is not None and normal(with_quick) != normal(routes):
            differences.append(
                f"{case.name}:\n  quick  {with_quick!r:.400}\n  routes {routes!r:.400}"
            )
        assert with_quick.startswith(b"HTTP/1.1 "), (case.name, with_quick)
    assert differences == [], "\n".join(differences)
    assert wrong_path == [], "\n".join(wrong_path)
    for keyed in (False, True):
        assert request_counts(servers[keyed, True][0]) == request_counts(servers[keyed, False][0])
    assert request_counts(servers[False, True][0]) != []


def test_a_kept_answer_gives_way_to_the_workers_next_write(
    servers: Servers, sessions: sessionmaker[Session]
) -> None:
    live = FakeTraining(sessions, PARAMS)
    live.submit()
    live.claim()
    live.advance(2)
    poll = get(f"/jobs/{live.job_id}/metrics?after_step=2")
    port = servers[False, True][0]
    first = exchange(port, poll)
    assert b'"steps":[]' in first and normal(exchange(port, poll)) == normal(first)
    live.advance(2, end_epoch=0.5)  # the worker's flush: another connection commits
    after = exchange(port, poll)
    assert b'"step":3' in after and b'"step":4' in after and b'"accuracy":0.5' in after
    assert normal(after) == normal(exchange(servers[False, False][0], poll))
    live.finish(JobStatus.SUCCEEDED)
    job = exchange(port, get(f"/jobs/{live.job_id}"))
    assert b'"status":"succeeded"' in job


def test_a_quick_answer_that_fails_is_left_to_the_app(
    servers: Servers,
    db_url: str,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("polls are read in threads there: the protocol answers none itself")
    done, _, _ = jobs(sessions)

    def broken(scope: Any) -> str:
        raise RuntimeError("a fault in the quick answer")

    monkeypatch.setattr(quick, "assign_request_id", broken)
    poll = get(f"/jobs/{done}/metrics?after_step=299")
    answered = exchange(servers[False, True][0], poll)
    assert normal(answered) == normal(exchange(servers[False, False][0], poll))
    assert answered.startswith(b"HTTP/1.1 200 ")
    assert "a quick answer failed; the app answers instead" in caplog.text


class Tasks:
    """Counts the requests uvicorn's protocol starts an ASGI task for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        start = HttpToolsProtocol._start_asgi_task

        def counted(protocol: HttpToolsProtocol, cycle: Any, app: Any) -> None:
            self.count += 1
            start(protocol, cycle, app)

        monkeypatch.setattr(HttpToolsProtocol, "_start_asgi_task", counted)


def request_ids(answers: bytes) -> list[bytes]:
    return re.findall(rb"\r\nx-request-id: ([^\r]*)\r\n", answers)


def test_a_client_that_pipelines_polls_without_reading_gets_each_answer_in_order(
    servers: Servers, db_url: str, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answered as they are parsed, until the answers the client has not read fill the
    # transport's buffer; from then on the app's way, which waits for the client to read.
    done, _, _ = jobs(sessions)
    counted, tasks = Counted(monkeypatch), Tasks(monkeypatch)
    polls = 400  # of 200 steps each: megabytes the client reads only once it has sent them all
    path = f"/jobs/{done}/metrics?after_step=50&limit=200"
    raw = b"".join(get(path, rid=f"n{i}", close=False) for i in range(polls))
    answered = exchange(servers[False, True][0], raw + get(path, rid="last"), window=4096)
    assert request_ids(answered) == [f"n{i}".encode() for i in range(polls)] + [b"last"]
    assert answered.count(b"HTTP/1.1 200 OK\r\n") == polls + 1
    if db_url.startswith("sqlite"):
        assert counted.count > 0 and tasks.count > 0, (counted.count, tasks.count)
        assert counted.count + tasks.count == polls + 1


def test_polls_pipelined_behind_a_request_of_the_apps_are_each_answered_in_order(
    servers: Servers, db_url: str, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Queued while /healthz is answered by the app; each starts as the one before it ends.
    done, _, _ = jobs(sessions)
    counted = Counted(monkeypatch)
    polls = 600
    raw = get("/healthz", rid="health", close=False)
    raw += b"".join(get(f"/jobs/{done}", rid=f"n{i}", close=False) for i in range(polls))
    answered = exchange(servers[False, True][0], raw + get(f"/jobs/{done}", rid="last"))
    assert request_ids(answered) == [b"health", *(f"n{i}".encode() for i in range(polls)), b"last"]
    assert counted.count > 0 or not db_url.startswith("sqlite")


@pytest.mark.parametrize(
    "refused",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="a header block"),
        pytest.param(
            b"POST /jobs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            id="the body of a request waiting its turn",
        ),
    ],
)
def test_a_refusal_comes_after_the_answers_owed_before_it(
    servers: Servers, routes_port: int, sessions: sessionmaker[Session], refused: bytes
) -> None:
    # A client pairs answers with its requests in order: a 400 sent while the app's request
    # before it was being answered took that request's place (its answer was lost).
    _, live, _ = jobs(sessions)
    raw = get("/jobs?limit=2", rid="a", close=False) + get(f"/jobs/{live}", rid="b", close=False)
    for port in (servers[False, True][0], servers[False, False][0], routes_port):
        answered = exchange(port, raw + refused)
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answered) == [b"200", b"200", b"400"]
        assert request_ids(answered) == [b"a", b"b"]


def test_what_is_pipelined_after_an_answer_that_closes_is_dropped(
    servers: Servers, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTTP/1.0 asks for keep-alive and the parser reads on, but uvicorn closes after the answer:
    # a request behind it must not run (here, a deletion of the polled job).
    done, _, _ = jobs(sessions)
    counted = Counted(monkeypatch)
    raw = (
        f"GET /jobs/{done} HTTP/1.0\r\nConnection: keep-alive\r\nX-Request-ID: first\r\n\r\n"
        f"DELETE /jobs/{done} HTTP/1.1\r\nHost: test\r\nX-Request-ID: second\r\n\r\n"
    ).encode()
    for quick_on in (True, False):
        before = counted.count
        answered = exchange(servers[False, quick_on][0], raw)
        assert request_ids(answered) == [b"first"] and answered.startswith(b"HTTP/1.1 200 ")
        assert exchange(servers[False, quick_on][0], get(f"/jobs/{done}")).startswith(
            b"HTTP/1.1 200 "
        ), "the request after the close ran"
    assert counted.count - before == 0  # the reference answered it the ASGI way


def test_a_quick_answer_behind_a_proxy_is_logged_for_the_client_the_proxy_names(
    servers: Servers,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    done, _, _ = jobs(sessions)
    counted = Counted(monkeypatch)
    poll = get(f"/jobs/{done}/metrics?after_step=299", "X-Forwarded-For: 10.1.2.3")
    lines = []
    for quick_on in (True, False):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="uvicorn.access"):
            exchange(servers[False, quick_on][0], poll)
        logged = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
        assert len(logged) == 1, logged
        lines.append(re.sub(r":\d+ - ", ":<port> - ", logged[0]))
    assert lines[0] == lines[1] and lines[0].startswith("10.1.2.3:"), lines
    assert counted.count == 1 or not servers[False, True][1].state.poll_reads.on_event_loop


def test_a_stream_opened_after_a_quick_answer_outlives_the_keep_alive_timeout(
    db_url: str,
    small_mnist: Path,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A quick answer arms the keep-alive timer at its end; the stream that follows in the same
    # read must stop it, as a request arriving later would.
    _, live, _ = jobs(sessions)
    counted = Counted(monkeypatch)
    keep_alive_s = 0.5
    app = create_app(app_settings(db_url, tmp_path, data_dir=small_mnist))
    with (
        serving(app, timeout_keep_alive=keep_alive_s) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(get(f"/jobs/{live}", close=False) + get(f"/jobs/{live}/events", close=False))
        sock.settimeout(0.1)
        received, deadline = b"", time.monotonic() + 4 * keep_alive_s
        while time.monotonic() < deadline:  # a window of time: the stream must stay open
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            assert chunk, f"closed after {received!r:.600}"
            received += chunk
        assert b"text/event-stream" in received
    assert counted.count == (1 if db_url.startswith("sqlite") else 0)
