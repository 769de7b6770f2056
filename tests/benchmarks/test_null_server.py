"""The server that does nothing (benchmarks/null_server.py), the floor of the metrics section's
200 polls/s: it answers every request of a keep-alive connection, pipelined or split across
reads, as a poll of the API's would be answered; and the section says which side of the goal
that floor lies on."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from benchmarks.metrics import floor_para
from benchmarks.null_server import ANSWER
from benchmarks.polled_jobs import PolledJobs
from benchmarks.predict import server
from benchmarks.stats import Series

POLL = b"GET /jobs/0/metrics?after_step=3 HTTP/1.1\r\nHost: bench\r\n\r\n"


def test_it_answers_every_request_of_a_connection(tmp_path: Path) -> None:
    with server(["-m", "benchmarks.null_server"], {}, tmp_path / "null.log") as (url, _pid):
        page = httpx.get(f"{url}/jobs/0/metrics", params={"after_step": 3})
        assert page.status_code == 200
        assert page.json() == {"job_id": "0", "steps": [], "epochs": [], "next_after_step": 0}
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(POLL * 2 + POLL[:20])  # two pipelined, and a third begun
            received = read_bytes(conn, 2 * len(ANSWER))
            conn.sendall(POLL[20:])  # the third's end
            received += read_bytes(conn, len(ANSWER))
            assert received == ANSWER * 3


def read_bytes(conn: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``conn`` (its timeout is the deadline of each read)."""
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def polled(label: str, quiet: list[float], watched: list[float], api_s: float) -> PolledJobs:
    jobs = PolledJobs(label, Series("quiet", "s"), Series("polled", "s"), [], [], polls=100)
    for q, p in zip(quiet, watched, strict=True):
        jobs.quiet.add(q)
        jobs.polled.add(p)
    jobs.api_cpu_s = api_s
    return jobs


def test_the_floor_is_said_to_meet_or_miss_the_goal_as_measured() -> None:
    api = polled("api", [1.0, 1.0, 1.0], [1.25, 1.2, 1.3], api_s=0.05)
    low = polled("null", [1.0, 1.0, 1.0], [1.05, 1.04, 1.06], api_s=0.01)
    high = polled("null", [1.0, 1.0, 1.0], [1.15, 1.14, 1.16], api_s=0.01)
    said_low, said_high = floor_para(low, api), floor_para(high, api)
    assert "+5.0%" in said_low and "+25.0%" in said_low and "can meet" in said_low
    assert "+15.0%" in said_high and "even a server that does nothing misses" in said_high
    assert "0.100 ms" in said_low and "0.500 ms" in said_low  # each side's CPU a poll
