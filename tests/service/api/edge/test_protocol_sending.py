"""The edge's send deadline on a connection whose client takes nothing (the edge protocol).

A transport that keeps every byte written, as a client that never reads leaves them: where an
answer's last bytes sit below asyncio's high-water mark, no write ever waits, and a close would
wait for them for good. A real socket puts the kernel's send queue (megabytes, a size of the
host's) before that buffer, so a real server reaches this case only at sizes found by a sweep:
here it is reached by construction.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from service.api.edge import protocol as edge
from service.api.edge.protocol import EdgeProtocol
from service.settings import Settings
from tests.support import wait_until

MARK = 4096  # the fake's high-water mark; its low-water mark is a quarter of it
TIMEOUT_S = 0.2


class Kept(asyncio.Transport):
    """A connection whose client takes only what :meth:`take` lets go; writes pause past
    :data:`MARK` and resume under a quarter of it, as asyncio's do."""

    def __init__(self, protocol: EdgeProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffered, self.paused, self.closing, self.aborted = 0, False, False, False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffered += len(data)
        if not self.paused and self.buffered > MARK:
            self.paused = True
            self.protocol.pause_writing()

    def take(self, left: int) -> None:
        """The client takes all but ``left`` bytes."""
        self.buffered = left
        if self.paused and left <= MARK // 4:
            self.paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True  # and waits for the buffer to be sent

    def abort(self) -> None:
        self.aborted = self.closing = True
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )


def answering(size: int, *, fails: bool = False) -> Any:
    """An app that answers every request ``size`` bytes, in one write; or, ``fails``, half of
    them, then raises."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", str(size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if fails:
            await send({"type": "http.response.body", "body": bytes(size // 2), "more_body": True})
            raise RuntimeError("the app failed mid-answer")
        await send({"type": "http.response.body", "body": bytes(size)})

    return app


@pytest.fixture(autouse=True)
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(send_timeout_s=TIMEOUT_S)
    monkeypatch.setattr(edge, "process_limits", lambda: (settings, 100))


async def connected(size: int, *, fails: bool = False) -> tuple[EdgeProtocol, Kept]:
    """A connection of the edge to an app answering ``size`` bytes (:func:`answering`), its
    request sent."""
    app = answering(size, fails=fails)
    config = uvicorn.Config(app, http=EdgeProtocol, log_config=None, lifespan="off")
    config.load()
    protocol = EdgeProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = Kept(protocol)
    protocol.connection_made(transport)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return protocol, transport


def answered(protocol: EdgeProtocol) -> bool:
    """Whether the app's answer is complete."""
    return protocol.running is not None and protocol.running.response_complete


def test_an_answers_tail_under_the_mark_is_not_held_for_good() -> None:
    """No write waited (the whole answer under the mark): the deadline starts as the answer
    is complete, and the connection is reset once the client has taken none of it."""

    async def main() -> None:
        protocol, transport = await connected(MARK // 2)
        await wait_until(lambda: transport.aborted, timeout_s=10, what="the reset")
        assert answered(protocol)

    asyncio.run(main())


def test_a_tail_left_as_writes_resume_after_the_answer_is_not_held_for_good() -> None:
    """The last write passed the mark (the deadline started), the answer completed, then the
    client took all but a tail under the low-water mark: writes resume, and the tail is
    watched still."""

    async def main() -> None:
        protocol, transport = await connected(MARK * 2)
        await wait_until(lambda: answered(protocol), timeout_s=10, what="the answer")
        transport.take(MARK // 8)
        await wait_until(lambda: transport.aborted, timeout_s=10, what="the reset")

    asyncio.run(main())


def test_what_an_app_that_failed_mid_answer_wrote_is_not_held_for_good() -> None:
    """uvicorn closes the connection of an app that raised once its answer had begun (no
    :meth:`on_response_complete`): the close waits for what was written."""

    async def main() -> None:
        _protocol, transport = await connected(MARK, fails=True)
        await wait_until(lambda: transport.closing, timeout_s=10, what="uvicorn's close")
        await wait_until(lambda: transport.aborted, timeout_s=10, what="the reset")

    asyncio.run(main())


def test_a_client_that_takes_its_answer_keeps_its_connection() -> None:
    async def main() -> None:
        protocol, transport = await connected(MARK * 2)
        await wait_until(lambda: answered(protocol), timeout_s=10, what="the answer")
        transport.take(MARK)  # some taken; writes still wait
        sending = protocol.sending  # a look sees it: the deadline starts again
        await wait_until(lambda: sending.unsent == MARK, timeout_s=10, what="a look")
        transport.take(0)
        assert protocol.sending.handle is None  # nothing waits: no deadline
        assert not transport.aborted and not transport.closing

    asyncio.run(main())
