"""HTTP load from a second process: wrk (Debian's ``wrk`` package) posting one body.

wrk is written in C and keeps 32 connections busy from one thread, so on a 2-core machine the
load generator takes as little as possible from the server it measures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")
CONNECTIONS = 32
WRK_THREADS = 1


@dataclass(frozen=True)
class LoadResult:
    """One load run: throughput and latency percentiles (ms); errors must be zero to count."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def rps(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def parse_wrk(output: str) -> LoadResult:
    """The JSON line ``wrk_post.lua`` prints at the end of wrk's output."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            data = json.loads(line)
            return LoadResult(
                requests=int(data["requests"]),
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p90_ms=data["p90_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
                non_2xx=int(data["non_2xx"]),
                socket_errors=int(data["socket_errors"]),
            )
    raise ValueError(f"no result line in wrk's output:\n{output}")


def wrk_path() -> str:
    """The wrk binary; a clear error naming the package when it is missing."""
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("the benchmarks need wrk: apt-get install wrk")
    return path


def multipart_body(field: str, filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part, and its Content-Type header."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def run_wrk(
    url: str,
    body_file: Path,
    content_type: str,
    *,
    seconds: float,
    connections: int = CONNECTIONS,
    threads: int = WRK_THREADS,
    method: str = "POST",
) -> LoadResult:
    """POST ``body_file`` to ``url`` (or GET it: ``method``, the body unused) from
    ``connections`` connections for ``seconds``."""
    env = {
        **os.environ,
        "BENCH_BODY": str(body_file),
        "BENCH_CONTENT_TYPE": content_type,
        "BENCH_METHOD": method,
    }
    proc = subprocess.run(
        [
            wrk_path(),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(WRK_SCRIPT),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    return parse_wrk(proc.stdout)
