"""What a user does to get a job's result, timed: submit, then poll or follow the events.

Also a watcher on the database itself, which tells when the worker's flushes became visible
(committed), so that the event stream's delay can be measured against them.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, func, select

from benchmarks.series_clients import CONTENT_LENGTH
from service.sse import parse
from service.status import TERMINAL, JobStatus
from service.store import wakeups
from service.store.tables import Job, TrainStep

POLL_EVERY_S = 0.010  # the client's pause between two GET /jobs/{id}
CHECK_BACK_S = 0.25  # ...of a client that leaves its job alone and checks back now and then
WATCH_EVERY_S = 0.002  # the database watcher's longest pause between two reads
WATCHER_READY_S = 10.0  # the longest a follow waits for its watcher's first read


class KeptAlive:
    """``GET`` over one keep-alive HTTP/1.1 connection on a bare socket, JSON back.

    The polling client runs on the cores the job trains on; httpx spent about as much CPU per
    poll as the API's fast lane answering it, so this client costs what one on another
    machine would cost them: next to nothing (as :class:`benchmarks.series_clients.Poller`).
    """

    def __init__(self, base_url: str) -> None:
        url = httpx.URL(base_url)
        self._host = url.host
        self._sock = socket.create_connection((url.host, url.port or 80), timeout=30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def get(self, path: str) -> Any:
        """The JSON body of ``GET path``; raises unless the answer is 200."""
        self._sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self._host}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._receive()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        length = CONTENT_LENGTH.search(head)
        if length is None:
            raise RuntimeError(f"GET {path}: no Content-Length in {head!r}")
        while len(self._buffer) < int(length[1]):
            self._buffer += self._receive()
        body, self._buffer = self._buffer[: int(length[1])], self._buffer[int(length[1]) :]
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"GET {path}: {status.decode()} {body[:300]!r}")
        return orjson.loads(body)

    def _receive(self) -> bytes:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()


@dataclass
class Finished:
    """One job as a client saw it finish."""

    seconds: float  # POST /jobs sent → `succeeded` seen
    job: dict[str, Any]  # the job as the API returned it at the end
    claim_s: float | None = None  # POST /jobs sent → the job seen out of `queued` (watcher)
    queued_claim_s: float | None = None  # the job's created_at → seen out of `queued`

    def _at(self, name: str) -> datetime:
        return datetime.fromisoformat(str(self.job[name]))

    @property
    def worker_s(self) -> float:
        """started_at → finished_at: the worker's own time."""
        return (self._at("finished_at") - self._at("started_at")).total_seconds()


def submit(client: httpx.Client, params: dict[str, Any]) -> tuple[str, float]:
    """POST /jobs; the job's id and the perf_counter time just before the request."""
    started = time.perf_counter()
    r = client.post("/jobs", json=params)
    r.raise_for_status()
    return str(r.json()["id"]), started


def _check(job: dict[str, Any]) -> bool:
    """Whether the job succeeded; raise if it ended otherwise."""
    if job["status"] in TERMINAL and job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    return bool(job["status"] == "succeeded")


def poll_to_result(
    client: httpx.Client,
    params: dict[str, Any],
    timeout_s: float,
    engine: Engine | None = None,
    every_s: float = POLL_EVERY_S,
    heard: wakeups.Listener | None = None,
) -> Finished:
    """Submit, then GET /jobs/{id} every ``every_s`` until it has succeeded; with ``engine``,
    a :class:`Watcher` tells when the job left the queue (then stops reading)."""
    job_id, started = submit(client, params)
    watcher = Watcher(engine, job_id, steps=False, heard=heard) if engine is not None else None
    if watcher is not None:
        watcher.start()
    poller = KeptAlive(str(client.base_url))
    try:
        deadline = started + timeout_s
        while time.perf_counter() < deadline:
            job = poller.get(f"/jobs/{job_id}")
            if _check(job):
                done = time.perf_counter()
                break
            time.sleep(every_s)
        else:
            raise TimeoutError(f"job {job_id} did not succeed in {timeout_s} s")
    finally:
        poller.close()
        if watcher is not None:
            watcher.stop()
    finished = Finished(done - started, job)
    _note_claim(finished, watcher, started)
    return finished


def _note_claim(finished: Finished, watcher: Watcher | None, started: float) -> None:
    """When the watcher saw the job leave the queue: after the POST was sent, and after the
    job's ``created_at`` (the API's clock before its INSERT; the same host's wall clock)."""
    if watcher is None or watcher.left_queue is None or watcher.left_queue_wall is None:
        return
    finished.claim_s = watcher.left_queue - started
    created = datetime.fromisoformat(str(finished.job["created_at"]))
    finished.queued_claim_s = watcher.left_queue_wall - created.timestamp()


@dataclass
class Followed:
    """One job followed on its event stream."""

    finished: Finished
    arrivals: list[tuple[int, float]] = field(default_factory=list)  # (last step, perf time)


def follow_to_result(
    client: httpx.Client,
    params: dict[str, Any],
    timeout_s: float,
    engine: Engine | None = None,
    *,
    watch_steps: bool = False,
    heard: wakeups.Listener | None = None,
) -> tuple[Followed, list[tuple[int, float]]]:
    """Submit, then follow GET /jobs/{id}/events until the final `status` event.

    With ``engine``, a :class:`Watcher` tells when the job left the queue and, with
    ``watch_steps``, when each flush of its steps became visible in the database (reading
    all along: it slows the job it watches, ~20% on PostgreSQL); returns the stream's
    arrivals and the watcher's sightings.
    """
    job_id, started = submit(client, params)
    watcher = (
        Watcher(engine, job_id, steps=watch_steps, heard=heard) if engine is not None else None
    )
    if watcher is not None:
        watcher.start()
        # Watching before the stream is followed: a job shorter than the watcher's start (a
        # test's 0.1-s job on a busy machine) was over before its first read, and no flush
        # was seen at all. Seen late, a flush's delay is long, never missing.
        watcher.ready.wait(WATCHER_READY_S)
    arrivals: list[tuple[int, float]] = []
    try:
        with client.stream("GET", f"/jobs/{job_id}/events", timeout=timeout_s) as r:
            r.raise_for_status()
            for event in parse(r.iter_lines()):
                now = time.perf_counter()
                data = event.json()
                if event.event == "step" and data["steps"]:
                    arrivals.append((int(data["steps"][-1]["step"]), now))
                elif event.event == "status" and data.get("final"):
                    _check(data)
                    followed = Followed(Finished(now - started, data), arrivals)
                    break
            else:
                raise RuntimeError(f"the stream of job {job_id} ended without a final status")
    finally:
        seen = watcher.stop() if watcher is not None else []
    _note_claim(followed.finished, watcher, started)
    return followed, seen


class Watcher(threading.Thread):
    """Reads the job's status (and, with ``steps``, its last stored step) every
    :data:`WATCH_EVERY_S`, and at once when ``heard`` (this process's listener of the service's
    wake-ups) says the job changed; notes when the job leaves `queued` and when its last step
    changes.

    What it sees is at most one pause (plus one read) after the commit that wrote it, so
    delays measured from it are short, and claim times long, by at most that much; woken by
    the commit's own wake-up, by one read. It shares
    the two cores with what it measures, so it reads cheaply: one connection, Core statements
    (an ORM session per read took ~1 ms, 500 times a second), and without ``steps`` it stops
    once the job has left the queue.
    """

    def __init__(
        self, engine: Engine, job_id: str, *, steps: bool, heard: wakeups.Listener | None = None
    ) -> None:
        super().__init__(daemon=True, name="step-watcher")
        self._engine, self._job_id, self._steps = engine, job_id, steps
        self._heard = heard or wakeups.Listener()  # the base listener wakes nobody: polling
        self._halt = wakeups.StopEvent()
        self.seen: list[tuple[int, float]] = []
        self.ready = threading.Event()  # set once its first read is done
        self.left_queue: float | None = None  # perf_counter
        self.left_queue_wall: float | None = None  # time.time(), to set against created_at

    def run(self) -> None:
        """Read until stopped (without ``steps``: until the job has left the queue)."""
        last = 0
        query = select(func.max(TrainStep.step)).where(TrainStep.job_id == self._job_id)
        status = select(Job.status).where(Job.id == self._job_id)
        with (
            self._heard.subscribe(wakeups.JOB_PROGRESS, self._job_id) as news,
            self._engine.connect() as connection,
        ):
            while not self._halt.is_set():
                with connection.begin():  # a read transaction: each read sees the last commit
                    if self.left_queue is None and connection.scalar(status) != JobStatus.QUEUED:
                        self.left_queue = time.perf_counter()
                        self.left_queue_wall = time.time()
                    step = (connection.scalar(query) or 0) if self._steps else 0
                if step > last:
                    self.seen.append((step, time.perf_counter()))
                    last = step
                self.ready.set()
                if self.left_queue is not None and not self._steps:
                    return
                news.wait(WATCH_EVERY_S, stop=self._halt)

    def stop(self) -> list[tuple[int, float]]:
        """Stop watching; each new last step and when it was first seen."""
        self._halt.set()
        self.join(timeout=10)
        return self.seen


def live_delays(seen: list[tuple[int, float]], arrivals: list[tuple[int, float]]) -> list[float]:
    """For each flush the watcher saw: seconds until a stream event carried its last step."""
    delays = []
    for step, committed in seen:
        arrived = [t for last, t in arrivals if last >= step]
        if arrived:
            delays.append(max(0.0, min(arrived) - committed))
    return delays
