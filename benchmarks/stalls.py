"""Connections that stall: half in their headers, half in their bodies, as a slow or hostile
client leaves them. The benchmark and the edge's test open the same ones and count, the same
way, which of them the server closes."""

from __future__ import annotations

import contextlib
import selectors
import socket
from collections.abc import Iterator
from contextlib import contextmanager

STALLS = (
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: a header that never ends",
    b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 1000\r\n\r\n{"epochs": ',
)


@contextmanager
def stalled(port: int, count: int) -> Iterator[selectors.BaseSelector]:
    """Open ``count`` stalled connections to ``127.0.0.1:port``; a selector that watches them
    for reading. Each still open is closed on exit."""
    selector = selectors.DefaultSelector()
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(STALLS[i % 2])
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        yield selector
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()


def reap(selector: selectors.BaseSelector, timeout_s: float) -> int:
    """Wait up to ``timeout_s`` for news on the stalled connections; forget (and close) each
    the server has closed. How many it closed."""
    closed = 0
    for key, _ in selector.select(timeout=timeout_s):
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        with contextlib.suppress(BlockingIOError):
            try:
                if sock.recv(65536):
                    continue  # an answer (408): the server's close follows
            except ConnectionResetError:
                pass
            selector.unregister(sock)
            sock.close()
            closed += 1
    return closed
