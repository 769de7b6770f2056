"""A process that follows jobs' event streams when told (``python -m benchmarks.stream_client
URL``): for each line ``JOB_ID STREAMS`` on its stdin it opens that many streams of the job at
once, reads each to its end, and prints ``JOB_ID EVENTS CHUNKS BYTES``: the events all of them
received, the chunks their bodies came in and those chunks' bytes (what a server that does next
to nothing writes in their place, :mod:`benchmarks.null_server`).

One process for the whole run, as a browser's ``EventSource`` is already running when it opens
a stream: a process per stream (curl) cost the job's cores several milliseconds each to start,
about as much as the API's work for the stream (docs/benchmarks.md). It runs on the job's cores
(unless ``MNIST_BENCH_CLIENT_CPUS`` moves it), so it does as little as a client can: uvloop, a
bare protocol per stream that keeps what arrives, ``Connection: close``, the answer read to the
server's close and checked once it is whole (asyncio's streams on its own loop cost it more
CPU per stream, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import uvloop

FINAL_EVENT = re.compile(rb"\nid: [0-9:]+:end\n")
STREAM_LIMIT_S = 600.0  # a stream longer than a benchmark's job: something is wrong


class _Stream(asyncio.Protocol):
    """One stream's connection: it sends the request and keeps every byte until the close."""

    def __init__(self, request: bytes, answer: asyncio.Future[bytes]) -> None:
        self._request, self._answer = request, answer
        self._chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self._request)  # uvloop's: no subclass

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer.done():
            return
        if exc is None:
            self._answer.set_result(b"".join(self._chunks))
        else:
            self._answer.set_exception(exc)


@dataclass(frozen=True)
class Carried:
    """What streams carried: events, the chunks of their bodies, and those chunks' bytes."""

    events: int = 0
    chunks: int = 0
    body_bytes: int = 0

    def __add__(self, other: Carried) -> Carried:
        return Carried(
            self.events + other.events,
            self.chunks + other.chunks,
            self.body_bytes + other.body_bytes,
        )

    def line(self, job_id: str) -> str:
        """The line the client prints for a job's streams."""
        return f"{job_id} {self.events} {self.chunks} {self.body_bytes}"

    @classmethod
    def parse(cls, line: str) -> Carried:
        """A printed line's figures (its job id left out)."""
        _, events, chunks, body_bytes = line.split()
        return cls(int(events), int(chunks), int(body_bytes))


def chunk_sizes(body: bytes) -> list[int]:
    """The sizes of a chunked body's chunks, up to its last (empty) one, which is not counted."""
    sizes: list[int] = []
    at = 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end].split(b";", 1)[0], 16)
        if size == 0:
            return sizes
        sizes.append(size)
        at = line_end + 2 + size + 2


async def follow(host: str, port: int, path: str) -> Carried:
    """One stream read to its end: what it carried. It must end as the service ends a
    stream: with the final event (its id ends in ``:end``) and the last chunk."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    transport, _ = await loop.create_connection(lambda: _Stream(request, answered), host, port)
    try:
        answer = await answered  # to the server's close
    finally:
        transport.close()
    status = answer.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"the stream of {path} was answered {status!r}")
    if not FINAL_EVENT.search(answer) or not answer.endswith(b"\r\n0\r\n\r\n"):
        raise RuntimeError(f"the stream of {path} ended before its final event")
    sizes = chunk_sizes(answer.split(b"\r\n\r\n", 1)[1])
    return Carried(answer.count(b"\nid: "), len(sizes), sum(sizes))


async def main(url: str) -> None:
    """Follow jobs as stdin names them, one line at a time."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        job_id, streams = line.split()
        path = f"/jobs/{job_id}/events"
        followed = asyncio.gather(*(follow(host, port, path) for _ in range(int(streams))))
        carried = await asyncio.wait_for(followed, STREAM_LIMIT_S)
        print(sum(carried, Carried()).line(job_id), flush=True)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
