"""A whole call's deadline, against a real socket that trickles its answer."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from service.cli import client as client_module
from service.cli.client import ApiError, Client
from tests.service.cli.conftest import JOB_ID

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"


@pytest.fixture
def trickling() -> Iterator[str]:
    """A server that answers a byte every 50 ms: each read comes well within its timeout, and
    the whole answer would take 50 s."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(HEAD)
            while not stop.wait(0.05):
                try:
                    conn.sendall(b" ")
                except OSError:  # the client gave up
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()


def test_an_answer_trickled_a_byte_at_a_time_ends_at_the_deadline(
    trickling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It held the call for as long as the server kept sending (for good, for a hostile one)."""
    monkeypatch.setattr(client_module, "DEADLINE_S", 0.5)
    client = Client(trickling)
    with pytest.raises(ApiError, match=r"took over 0\.5 s to answer") as caught:
        client.job(JOB_ID)
    assert caught.value.status == 0  # unreachable: exit 3, and a watch waits it out
    client.close()
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # left as it was found
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_call_from_another_thread_sets_no_timer(trickling: str) -> None:
    """Only the main thread receives a signal: a client used as a library elsewhere keeps
    httpx's own timeouts, and the thread's call does not disturb the process's timer."""

    def call() -> None:
        client = Client(trickling)
        with contextlib.suppress(ApiError):  # the server goes away at the test's end
            client.job(JOB_ID)
        client.close()

    signal.setitimer(signal.ITIMER_REAL, 0)
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=0.3)  # it is still reading, and no timer was set for it
    assert thread.is_alive() and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
