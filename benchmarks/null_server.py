"""``python -m benchmarks.null_server``: an HTTP server that does next to nothing but answer.

Every request on a keep-alive connection gets the same bytes at once (a metrics page with no
steps, 200): no framework, no database, no parsing beyond the end of a header block. Polled as
the API is polled while a job trains (benchmarks/metrics.py), it shows what the same polls take
from the job when the server costs next to nothing, the pollers still on the same cores: a
practical floor for that client, beside the goal's verdict. (A server in C, or pollers on
another machine, would cost the job less.) Listens on MNIST_HOST:MNIST_PORT, as
``python -m service``.

A request for an event stream (a path ending in ``/events``) is the floor of the metrics
section's crowd of streams: it is answered with a chunked body, the same for every stream, of
``MNIST_NULL_STREAM_CHUNKS`` chunks carrying ``MNIST_NULL_STREAM_BYTES`` in all (what the API's
streams of a job carried on average), the first at once and the rest at even intervals over
``MNIST_NULL_STREAM_S`` (a job's time), the last with the final event and the body's end, then
the close. The streams of one path share their schedule from the first one's arrival, and each
of its writes goes to all of them in one callback: what the API would do at the least, with
the job's writes known in advance and nothing read or encoded.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import cast

import uvloop

BODY = b'{"job_id":"0","steps":[],"epochs":[],"next_after_step":0}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
END_OF_HEAD = b"\r\n\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def stream_chunks(chunks: int, body_bytes: int) -> list[bytes]:
    """A stream's body, framed: ``chunks`` events of ``body_bytes`` in all, shared out evenly
    (each at least what an event's fields take), the last one final (its id ends in ``:end``,
    as the API's does) and followed by the body's end."""
    framed = []
    share, rest = divmod(body_bytes, chunks)
    for index in range(chunks):
        last = index == chunks - 1
        event_id = f"0:0:0:{index + 1}{':end' if last else ''}"
        event = f"event: status\nid: {event_id}\ndata: ".encode()
        data = max(2, share + (index < rest) - len(event) - 2)  # a JSON string, and "\n\n"
        event += b'"' + b"x" * (data - 2) + b'"\n\n'
        framed.append(b"%x\r\n%s\r\n" % (len(event), event) + (LAST_CHUNK if last else b""))
    return framed


@dataclass(frozen=True)
class Schedule:
    """What each stream is written, and over how long."""

    chunks: list[bytes]
    span_s: float

    @classmethod
    def from_env(cls) -> Schedule:
        """The schedule the environment sets (a short one by default)."""
        chunks = int(os.environ.get("MNIST_NULL_STREAM_CHUNKS", "3"))
        body_bytes = int(os.environ.get("MNIST_NULL_STREAM_BYTES", "1000"))
        if chunks < 1 or body_bytes < 0:
            raise ValueError("a stream has at least one chunk, and no fewer than 0 bytes")
        return cls(
            stream_chunks(chunks, body_bytes), float(os.environ.get("MNIST_NULL_STREAM_S", "0.3"))
        )


@dataclass
class Crowd:
    """The open streams of one path, written to together on the server's schedule."""

    transports: list[asyncio.Transport] = field(default_factory=list)
    sent: int = 1  # chunks written to every stream so far (the first as each one opens)


class NullServer:
    """The crowds of streams, by path, and each connection's protocol."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.crowds: dict[bytes, Crowd] = {}

    def protocol(self) -> Answer:
        """A new connection's protocol."""
        return Answer(self)

    def open_stream(self, path: bytes, transport: asyncio.Transport) -> None:
        """Answer a stream's request: the head and the body's first chunk now, the rest as its
        crowd is written to (a crowd begins with its first stream)."""
        crowd = self.crowds.get(path)
        if crowd is None:
            crowd = self.crowds[path] = Crowd()
            loop = asyncio.get_running_loop()
            start, later = loop.time(), len(self.schedule.chunks) - 1
            for index in range(1, later + 1):
                loop.call_at(start + index * self.schedule.span_s / later, self.write, path)
        transport.write(STREAM_HEAD + self.schedule.chunks[0])
        if len(self.schedule.chunks) == 1:
            transport.close()
            return
        crowd.transports.append(transport)

    def write(self, path: bytes) -> None:
        """The crowd's next chunk to each of its streams; after the last, each is closed."""
        crowd = self.crowds[path]
        chunk = self.schedule.chunks[crowd.sent]
        crowd.sent += 1
        ended = crowd.sent == len(self.schedule.chunks)
        if ended:
            del self.crowds[path]
        for transport in crowd.transports:
            if not transport.is_closing():
                transport.write(chunk)
                if ended:
                    transport.close()


class Answer(asyncio.Protocol):
    """Answers each header block received (GETs: no body), in order, pipelined ones too; a
    stream's request ends what the connection answers."""

    def __init__(self, server: NullServer) -> None:
        self.server = server
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
        if not blocks:
            return
        heads, _, self.pending = self.pending.rpartition(END_OF_HEAD)
        if b"/events " not in heads:
            self.transport.write(ANSWER * blocks)
            return
        self.transport.pause_reading()  # the stream is the connection's last answer
        before = heads.partition(b"/events ")[0]
        self.transport.write(ANSWER * before.count(END_OF_HEAD))
        request_line = before.rsplit(END_OF_HEAD, 1)[-1]
        self.server.open_stream(request_line.split(b" ", 1)[1] + b"/events", self.transport)


async def serve(host: str, port: int) -> None:
    """Answer on ``host:port`` until killed."""
    null = NullServer(Schedule.from_env())
    server = await asyncio.get_running_loop().create_server(null.protocol, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(os.environ.get("MNIST_HOST", "127.0.0.1"), int(os.environ["MNIST_PORT"])))
