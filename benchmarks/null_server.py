"""``python -m benchmarks.null_server``: an HTTP server that does next to nothing but answer.

Every request on a keep-alive connection gets the same bytes at once (a metrics page with no
steps, 200): no framework, no database, no parsing beyond the end of a header block. Polled as
the API is polled while a job trains (benchmarks/metrics.py), it shows what the same polls take
from the job when the server costs next to nothing, the pollers still on the same cores: a
practical floor for that client, beside the goal's verdict. (A server in C, or pollers on
another machine, would cost the job less.) Listens on MNIST_HOST:MNIST_PORT, as
``python -m service``.
"""

from __future__ import annotations

import asyncio
import os
from typing import cast

import uvloop

BODY = b'{"job_id":"0","steps":[],"epochs":[],"next_after_step":0}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
END_OF_HEAD = b"\r\n\r\n"


class Answer(asyncio.Protocol):
    """Answers each header block received (GETs: no body), in order, pipelined ones too."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the connection's transport (uvloop's is not a subclass of asyncio's)."""
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """One answer per complete header block."""
        assert self.transport is not None
        self.pending += data
        blocks = self.pending.count(END_OF_HEAD)
        if blocks:
            self.pending = self.pending.rsplit(END_OF_HEAD, 1)[1]
            self.transport.write(ANSWER * blocks)


async def serve(host: str, port: int) -> None:
    """Answer on ``host:port`` until killed."""
    server = await asyncio.get_running_loop().create_server(Answer, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(os.environ.get("MNIST_HOST", "127.0.0.1"), int(os.environ["MNIST_PORT"])))
