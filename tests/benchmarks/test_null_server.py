"""The server that does nothing (benchmarks/null_server.py), the floor of the metrics section's
200 polls/s: it answers every request of a keep-alive connection, pipelined or split across
reads, as a poll of the API's would be answered; and the section says which side of the goal
that floor lies on. The floor of its crowd of event streams: each stream of a job is written
the chunks and bytes it is set to, over the time it is set to, and ends as the API's do."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.null_server import ANSWER, STREAM_HEAD, stream_chunks
from benchmarks.polled_jobs import PolledJobs
from benchmarks.predict import server
from benchmarks.stats import Series
from benchmarks.stream_client import Carried, chunk_sizes
from benchmarks.stream_followers import FollowedJobs, Followers
from benchmarks.watching_text import crowd_floor_para, floor_para

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


def streams_env(chunks: int, body_bytes: int, span_s: float) -> dict[str, str]:
    return {
        "MNIST_NULL_STREAM_CHUNKS": str(chunks),
        "MNIST_NULL_STREAM_BYTES": str(body_bytes),
        "MNIST_NULL_STREAM_S": str(span_s),
    }


def test_a_streams_body_is_the_chunks_and_bytes_it_is_set_to() -> None:
    body = b"".join(stream_chunks(3, 900))
    assert chunk_sizes(body) == [300, 300, 300]
    assert chunk_sizes(b"".join(stream_chunks(3, 902))) == [301, 301, 300]
    assert b"id: 0:0:0:1\n" in body and b"id: 0:0:0:3:end\n" in body
    assert body.endswith(b"\r\n0\r\n\r\n") and body.count(b":end\n") == 1
    assert chunk_sizes(b"".join(stream_chunks(1, 0)))[0] > 0  # an event's fields at least


def test_a_crowds_streams_are_written_on_one_schedule(tmp_path: Path) -> None:
    span_s = 0.3
    env = streams_env(4, 2000, span_s)
    with server(["-m", "benchmarks.null_server"], env, tmp_path / "null.log") as (url, _pid):
        with Followers(url) as followers:  # the metrics section's client checks each end
            started = time.monotonic()
            followers.open("0" * 32, 5)
            carried = followers.ended()
            assert time.monotonic() - started >= span_s  # the last chunk came at the span's end
            followers.open("1" * 32, 1)  # a crowd of one, after the first crowd ended
            assert followers.ended() == Carried(4, 4, 2000)
        assert carried == Carried(events=5 * 4, chunks=5 * 4, body_bytes=5 * 2000)
        # A poll pipelined before a stream's request is answered first, then the stream.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(POLL + b"GET /jobs/2/events HTTP/1.1\r\nHost: bench\r\n\r\n")
            first = stream_chunks(4, 2000)[0]
            assert read_bytes(conn, len(ANSWER + STREAM_HEAD + first)) == (
                ANSWER + STREAM_HEAD + first
            )


def test_a_one_chunk_stream_ends_at_once(tmp_path: Path) -> None:
    env = streams_env(1, 100, 60.0)
    with server(["-m", "benchmarks.null_server"], env, tmp_path / "null.log") as (url, _pid):
        with httpx.stream("GET", f"{url}/jobs/0/events", timeout=10) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert b"id: 0:0:0:1:end\n" in response.read()  # no wait for the 60 s span
        with Followers(url) as followers:
            followers.open("0" * 32, 3)
            assert followers.ended() == Carried(3, 3, 300)


def followed(quiet: list[float], watched: list[float], server_s: float) -> FollowedJobs:
    jobs = FollowedJobs(200, Series("quiet", "s"), Series("followed", "s"))
    for q, f in zip(quiet, watched, strict=True):
        jobs.quiet.add(q)
        jobs.followed.add(f)
    jobs.api_cpu_s = server_s
    jobs.carried = Carried(events=10 * 600, chunks=7 * 600, body_bytes=35_000 * 600)
    return jobs


def test_the_crowds_floor_is_written_what_the_crowd_carried_and_judged() -> None:
    crowd = followed([0.3, 0.4, 0.5], [0.4, 0.5, 0.6], server_s=0.48)
    assert crowd.null_streams_env() == {
        "MNIST_NULL_STREAM_CHUNKS": "7",
        "MNIST_NULL_STREAM_BYTES": "35000",
        "MNIST_NULL_STREAM_S": "0.400000",
    }
    within = crowd_floor_para(followed([1.0] * 3, [1.05, 1.04, 1.06], server_s=0.06), crowd)
    assert "+5.0% (+4.0% to +6.0%" in within and f"{crowd.slowdown:+.1%}" in within
    assert "0.100 ms of its CPU per stream per job, against the API's 0.800 ms" in within
    assert "(7.0 chunks, 35.0 kB)" in within and "(0.400 s)" in within
    assert "within the 10%: a server can meet it here, and what the API adds" in within
    above = crowd_floor_para(followed([1.0] * 3, [1.15, 1.14, 1.16], server_s=0.06), crowd)
    assert "with this client beside the job, even a server that does next to nothing" in above
