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
import re
import sys
from urllib.parse import urlsplit

FINAL_EVENT = re.compile(rb"\nid: [0-9:]+:end\n")
STREAM_LIMIT_S = 600.0  # a stream longer than a benchmark's job: something is wrong


async def follow(host: str, port: int, path: str) -> int:
    """One stream read to its end; how many events it carried. It must end as the service
    ends a stream: with the final event (its id ends in ``:end``) and the last chunk."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        answer = await asyncio.wait_for(reader.read(), STREAM_LIMIT_S)  # to the server's close
    finally:
        writer.close()
        await writer.wait_closed()
    status = answer.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"the stream of {path} was answered {status!r}")
    if not FINAL_EVENT.search(answer) or not answer.endswith(b"\r\n0\r\n\r\n"):
        raise RuntimeError(f"the stream of {path} ended before its final event")
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
