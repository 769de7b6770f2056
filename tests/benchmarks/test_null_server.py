"""The server that does nothing (benchmarks/null_server.py), the floor of the metrics section's
200 polls/s: it answers every request of a keep-alive connection, pipelined or split across
reads, as a poll of the API's would be answered; and the section says which side of the goal
that floor lies on."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from benchmarks.null_server import ANSWER
from benchmarks.polled_jobs import PolledJobs
from benchmarks.predict import server
from benchmarks.stats import Series
from benchmarks.watching_text import floor_para

NOTHING_MORE_S = 0.2
POLL = b"GET /jobs/0/metrics?after_step=3 HTTP/1.1\r\nHost: bench\r\n\r\n"


def test_it_answers_every_request_of_a_connection(tmp_path: Path) -> None:
    with server(["-m", "benchmarks.null_server"], {}, tmp_path / "null.log") as (url, _pid):
        page = httpx.get(f"{url}/jobs/0/metrics", params={"after_step": 3})
        assert page.status_code == 200
        assert page.json() == {"job_id": "0", "steps": [], "epochs": [], "next_after_step": 0}
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(POLL * 2 + POLL[:20])  # two pipelined, and a third begun
            assert read_bytes(conn, 2 * len(ANSWER)) == ANSWER * 2
            assert_nothing_more(conn)  # no answer to a request not yet whole
            conn.sendall(POLL[20:])
            assert read_bytes(conn, len(ANSWER)) == ANSWER
            # A header block whose blank line is split across reads: answered once, when whole.
            for cut in (1, 2, 3):  # "\r\n\r" | "\n", "\r\n" | "\r\n", "\r" | "\n\r\n"
                conn.sendall(POLL[:-cut])
                assert_nothing_more(conn)
                conn.sendall(POLL[-cut:])
                assert read_bytes(conn, len(ANSWER)) == ANSWER
            assert_nothing_more(conn)


def assert_nothing_more(conn: socket.socket) -> None:
    """Nothing more comes within a moment (a wrong answer would come at once: the server
    answers as it reads). Never fails a server that answers right."""
    conn.settimeout(NOTHING_MORE_S)
    try:
        with pytest.raises(TimeoutError):
            conn.recv(1)
    finally:
        conn.settimeout(10)


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


def test_the_floor_is_judged_by_its_interval() -> None:
    api = polled("api", [1.0, 1.0, 1.0], [1.25, 1.2, 1.3], api_s=0.05)
    within = floor_para(polled("null", [1.0] * 3, [1.05, 1.04, 1.06], api_s=0.01), api)
    above = floor_para(polled("null", [1.0] * 3, [1.15, 1.14, 1.16], api_s=0.01), api)
    across = floor_para(polled("null", [1.0] * 3, [1.05, 1.15, 1.10], api_s=0.01), api)
    assert "+5.0% (+4.0% to +6.0%" in within and "+25.0%" in within
    assert "within the 10%: a server can meet it here, and what the API adds" in within
    assert "0.100 ms" in within and "0.500 ms" in within  # each server's CPU a poll
    assert "above the 10%" in above and "even a server that does next to nothing misses" in above
    assert "holds the 10%: 3 rounds cannot tell" in across
    # An API that came out below its floor (chance) is not said to add anything.
    lucky = polled("api", [1.0] * 3, [1.03, 1.02, 1.04], api_s=0.05)
    assert "what the API adds" not in floor_para(
        polled("null", [1.0] * 3, [1.05, 1.04, 1.06], api_s=0.01), lucky
    )
