"""Clients of a job's metrics series: a whole-series reader, a poller at a fixed rate, and a
health probe that runs while other clients read whole series."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx
import orjson

from benchmarks.load import wrk_path
from benchmarks.predict import server
from benchmarks.procs import cpu_seconds
from benchmarks.stats import Series
from service.api.routes.jobs import MAX_STEPS_PAGE

CONTENT_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")
PROBE_PERIOD_S = 0.02  # one /healthz every 20 ms
WRK_POLL_SCRIPT = Path(__file__).with_name("wrk_poll.lua")


def read_whole_series(client: httpx.Client, job_id: str) -> int:
    """Every step of a job, page after page as a client reads it; how many steps."""
    after, total = 0, 0
    while True:
        r = client.get(
            f"/jobs/{job_id}/metrics", params={"after_step": after, "limit": MAX_STEPS_PAGE}
        )
        r.raise_for_status()
        body = orjson.loads(r.content)
        total += len(body["steps"])
        if not body["steps"]:
            return total
        after = body["next_after_step"]


class Poller:
    """Polls a job's new steps at a fixed rate, as live loss charts would.

    ``connections`` keep-alive connections share the rate, each asking for the steps after the
    last one it saw (wrk with benchmarks/wrk_poll.lua). The poller runs on the same cores as
    the job, so it should cost as little CPU as a client on another machine would cost them:
    wrk's event loop in C takes about half the CPU per poll that a bare asyncio client on
    uvloop took, and a fifth of one on asyncio's own loop (docs/benchmarks.md).
    """

    def __init__(self, base_url: str, job_id: str, rate_hz: float, connections: int) -> None:
        self._env = {
            **os.environ,
            "BENCH_PATH": f"/jobs/{job_id}/metrics",
            "BENCH_RATE_HZ": str(rate_hz),
        }
        self._args = [
            wrk_path(),
            "-t1",
            f"-c{connections}",
            "-d1h",  # until stopped
            "-s",
            str(WRK_POLL_SCRIPT),
            base_url,
        ]
        self._proc: subprocess.Popen[str] | None = None
        self.p50_ms = float("nan")
        self.cpu_s = float("nan")  # wrk's own CPU seconds, once stopped

    def start(self) -> None:
        """Start polling."""
        self._proc = subprocess.Popen(
            self._args, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> int:
        """Stop polling; how many polls were answered (each with 200)."""
        if self._proc is None:
            raise RuntimeError("the poller was not started")
        self.cpu_s = cpu_seconds(self._proc.pid)
        self._proc.send_signal(signal.SIGINT)  # wrk stops and reports
        out, err = self._proc.communicate(timeout=30)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self._proc.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({self._proc.returncode}): {err[-2000:]}")
        result = orjson.loads(lines[-1])
        if result["non_2xx"] or result["socket_errors"]:
            raise RuntimeError(f"polls were refused or failed: {result}")
        self.p50_ms = result["p50_us"] / 1000
        return int(result["requests"])


def _read_until(url: str, job_id: str, steps: int, stop: Event, reads: Queue[int]) -> None:
    """A reader process: the whole series again and again until ``stop``; it reports each."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            if read_whole_series(client, job_id) != steps:
                raise RuntimeError("the API did not return the whole series")
            reads.put(1)


def _probe_healthz(url: str, seconds: float) -> Series:
    """``GET /healthz`` every :data:`PROBE_PERIOD_S` for ``seconds`` on one kept-alive
    connection: each answer's wall time (ms). A bare socket, so that the figure is the
    server's and little of it the client's."""
    target = httpx.URL(url)
    request = f"GET /healthz HTTP/1.1\r\nHost: {target.host}\r\n\r\n".encode()
    series = Series("/healthz", "ms")
    with socket.create_connection((target.host, target.port or 80), timeout=30) as sock:
        stream = sock.makefile("rb")
        deadline = time.perf_counter() + seconds
        next_at = time.perf_counter()
        while next_at < deadline:
            started = time.perf_counter()
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = stream.readline()
                if not line:
                    raise RuntimeError("the server closed the probe's connection")
                head += line
            length = CONTENT_LENGTH.search(head)
            if not head.startswith(b"HTTP/1.1 200") or length is None:
                raise RuntimeError(f"unexpected answer to /healthz: {head[:200]!r}")
            stream.read(int(length[1]))
            series.add((time.perf_counter() - started) * 1000)
            next_at = max(next_at + PROBE_PERIOD_S, time.perf_counter())
            time.sleep(max(0.0, next_at - time.perf_counter()))
    return series


def healthz_while_reading(
    url: str, job_id: str, *, steps: int, readers: int, seconds: float
) -> tuple[Series, int]:
    """``/healthz`` latencies (ms) while ``readers`` clients each read a job's whole series
    (``steps`` steps) over and over; and how many whole series they read while probed.

    The readers are processes of their own, so that their JSON parsing does not hold up the
    probe in this one. With ``readers=0``, the same probes on an otherwise idle server.
    """
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    reads: Queue[int] = spawn.Queue()
    procs = [
        spawn.Process(target=_read_until, args=(url, job_id, steps, stop, reads), daemon=True)
        for _ in range(readers)
    ]
    for p in procs:
        p.start()
    read_while_probed = 0
    try:
        for _ in procs:  # every reader has read the series once: they are all under way
            reads.get(timeout=120)
        series = _probe_healthz(url, seconds)
        while not reads.empty():
            read_while_probed += reads.get()
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a series reader failed")
    return series, read_while_probed


@dataclass
class HealthUnderReads:
    """``/healthz`` on an idle server and while clients read whole series."""

    idle: Series
    reading: Series
    series_read: int  # whole series the readers read while ``reading`` was probed


def healthz_under_reads(
    env: dict[str, str], job_id: str, *, steps: int, readers: int, seconds: float, log: Path
) -> HealthUnderReads:
    """:func:`healthz_while_reading` on a server of one process (``MNIST_API_WORKERS=1``).

    With one process the readers' requests and the probe's share one event loop, so anything
    that holds up the loop shows in the probe; with several, the probe could be answered by a
    process the readers left alone.
    """
    one_process = {**env, "MNIST_API_WORKERS": "1", "MNIST_ACCESS_LOG": "false"}
    with server(["-m", "service"], one_process, log) as (url, _pid):
        idle, _ = healthz_while_reading(url, job_id, steps=steps, readers=0, seconds=seconds / 2)
        reading, series_read = healthz_while_reading(
            url, job_id, steps=steps, readers=readers, seconds=seconds
        )
    return HealthUnderReads(idle, reading, series_read)
