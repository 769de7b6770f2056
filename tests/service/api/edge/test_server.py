"""What the edge asks of a connection's socket (service/api/edge/server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from service.api.edge.server import MIN_BODY_RATE, BodyPace, SendDeadline, unsent_bytes
from tests.support import wait_for, wait_until


class Unsent(asyncio.WriteTransport):
    """A transport whose buffer holds ``buffered`` bytes (under any high-water mark), over
    ``sock`` if given; it records its abort."""

    def __init__(self, buffered: int, sock: socket.socket | None = None) -> None:
        super().__init__()
        self.buffered, self.sock, self.aborted = buffered, sock, False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def abort(self) -> None:
        self.aborted = True


def test_what_a_client_has_yet_to_take_counts_the_sockets_queue() -> None:
    """A slow reader empties the kernel's send queue before asyncio's buffer moves: the send
    deadline (service/api/edge/protocol.py) sees the reader's progress there."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server, _ = listener.accept()
        with client, server:
            server.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # until the kernel takes no more: the client reads nothing yet
                    server.send(bytes(65536))
            transport = Unsent(100, server)
            queued = unsent_bytes(transport)
            assert queued > 100 + 4096  # the socket's queue, beyond what the client holds
            client.settimeout(10)

            def took_some() -> bool:
                client.recv(4096)  # a slow reader, a little at a time
                return unsent_bytes(transport) < queued

            wait_for(took_some, timeout_s=10, what="the queue to shrink")
    assert unsent_bytes(Unsent(100, server)) == 100  # a closed socket: none


def test_an_answers_tail_its_client_never_takes_is_reset() -> None:
    """An answer complete but for a tail under asyncio's high-water mark: no write waits, so
    nothing pauses, and a close would wait for the tail for good. The deadline watches it, and
    resets the connection: the kernel's queue goes with it at once."""
    with socket.socket() as sock:

        async def main() -> None:
            transport = Unsent(100, sock)
            deadline = SendDeadline(asyncio.get_running_loop(), timeout_s=0.05)
            deadline.watch(transport)
            await wait_until(lambda: transport.aborted, timeout_s=10, what="the reset")

        asyncio.run(main())
        linger = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    assert linger == (1, 0)


def test_a_client_that_takes_some_in_each_interval_keeps_its_connection() -> None:
    async def main() -> None:
        transport = Unsent(20)
        deadline = SendDeadline(asyncio.get_running_loop(), timeout_s=0.5)
        deadline.watch(transport)
        while transport.buffered:  # a byte taken in every tenth of the interval
            await asyncio.sleep(0.05)
            transport.buffered -= 1
        await wait_until(lambda: deadline.handle is None, timeout_s=10, what="no deadline")
        assert not transport.aborted
        deadline.watch(transport)
        assert deadline.handle is None  # an empty buffer starts none

    asyncio.run(main())


def test_a_look_that_finds_more_waiting_judges_the_client_at_the_next() -> None:
    """More waiting than at the last look: the server wrote more (the next pipelined answer),
    and it can't be told whether the client took some meanwhile. No reset then; the next look
    judges the client alone."""

    async def main() -> None:
        transport = Unsent(100)
        deadline = SendDeadline(asyncio.get_running_loop(), timeout_s=1.0)
        deadline.watch(transport)
        transport.buffered = 150
        await wait_until(lambda: deadline.unsent == 150, timeout_s=10, what="the first look")
        assert not transport.aborted
        # Nothing taken since: the second look resets.
        await wait_until(lambda: transport.aborted, timeout_s=10, what="the reset")

    asyncio.run(main())


def test_a_body_is_late_when_silent_or_once_behind_the_least_pace() -> None:
    pace = BodyPace(limit_s=10.0)
    pace.begin(now=0.0)
    for second in range(1, 60):  # twice the least pace: never late
        pace.came(now=float(second), size=2 * MIN_BODY_RATE)
        assert pace.left(now=second + 0.5) > 0
    pace.begin(now=100.0)
    for second in range(101, 110):  # a byte a second: early on, the first limit_s is its own
        pace.came(now=float(second), size=1)
        assert pace.left(now=float(second)) > 0
    assert pace.left(now=110.1) <= 0  # behind the pace, though never silent for limit_s
    assert pace.why(now=110.1) == f"the request body came slower than {MIN_BODY_RATE} bytes/s"
    pace.excuse(now=110.1)  # the server stopped reading: the client is given the time again
    assert pace.left(now=115.0) > 0
    assert pace.why(now=125.0) == "the request body stalled for 10 s"
