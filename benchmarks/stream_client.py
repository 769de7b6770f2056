"""A process that follows jobs' event streams when told (``python -m benchmarks.stream_client
URL``): for each line ``JOB_ID STREAMS`` on its stdin it opens that many streams of the job at
once, reads each to its end, and prints ``JOB_ID EVENTS`` (the events all of them received).

One process for the whole run, as a browser's ``EventSource`` is already running when it opens
a stream: a process per stream (curl) cost the job's cores several milliseconds each to start,
about as much as the API's work for the stream (docs/benchmarks.md). Plain asyncio streams and
``Connection: close``: the answer is read to the server's close, and only its events counted.
"""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import urlsplit


async def follow(host: str, port: int, path: str) -> int:
    """One stream read to its end; how many events it carried."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        answer = await reader.read()  # to the server's close, after the final event
    finally:
        writer.close()
    status = answer.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"the stream of {path} was answered {status!r}")
    return answer.count(b"\nid: ")


async def main(url: str) -> None:
    """Follow jobs as stdin names them, one line at a time."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        job_id, streams = line.split()
        path = f"/jobs/{job_id}/events"
        counts = await asyncio.gather(*(follow(host, port, path) for _ in range(int(streams))))
        print(job_id, sum(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
