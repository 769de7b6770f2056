"""Clients of a job's metrics series: a whole-series reader, a poller at a fixed rate, and a
health probe that runs while other clients read whole series."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx
import orjson

from benchmarks.env import client_command
from benchmarks.load import wrk_path
from benchmarks.predict import server
from benchmarks.procs import exact_cpu_seconds
from benchmarks.stats import Series
from service.api.routes.jobs import MAX_STEPS_PAGE

CONTENT_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")
PROBE_PERIOD_S = 0.02  # one /healthz every 20 ms
WRK_POLL_SCRIPT = Path(__file__).with_name("wrk_poll.lua")
MAX_POLL_S = 900  # a poller stops by itself after this, whatever becomes of the run


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

    ``connections`` keep-alive connections share the rate, each its own wrk process
    (benchmarks/wrk_poll.lua; a process's one Lua state holds its connection's last step seen),
    each asking for the steps after the last one it saw, their schedules offset so that the
    polls come evenly. The poller runs on the same cores as the job (unless
    ``MNIST_BENCH_CLIENT_CPUS`` moves it, :func:`benchmarks.env.client_cpus`), so it should
    cost as little CPU as a client on another machine would cost them: wrk's event loop in C
    takes about three fifths of the CPU per poll that a bare asyncio client on uvloop took, and
    under half of one on asyncio's own loop; a wrk process per connection costs no more than one
    for them all (docs/benchmarks.md). A context manager: whatever happens, no wrk outlives it.
    """

    def __init__(self, base_url: str, job_id: str, rate_hz: float, connections: int) -> None:
        spacing_ms = 1000 / rate_hz  # between two polls of all the connections
        self._envs = [
            {
                **os.environ,
                "BENCH_PATH": f"/jobs/{job_id}/metrics",
                "BENCH_RATE_HZ": str(rate_hz / connections),
                "BENCH_PHASE_MS": str(i * spacing_ms),
            }
            for i in range(connections)
        ]
        args = ["-t1", "-c1", f"-d{MAX_POLL_S}s", "-s", str(WRK_POLL_SCRIPT), base_url]
        self._args = [wrk_path(), *args]
        self._procs: list[subprocess.Popen[str]] = []
        self.p50_ms = float("nan")  # the median of the connections' p50s
        self.rate_hz = float("nan")  # polls a second, from the pollers' own clocks
        self.cpu_s = float("nan")  # the pollers' own CPU seconds

    def __enter__(self) -> Poller:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()

    def start(self) -> None:
        """Start polling."""
        for env in self._envs:
            self._procs.append(
                subprocess.Popen(
                    client_command(self._args),
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )

    def kill(self) -> None:
        """Stop every poller at once, without a report."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def stop(self) -> int:
        """Stop polling; how many polls were answered (none with an error status)."""
        if not self._procs:
            raise RuntimeError("the poller was not started")
        self.cpu_s = sum(exact_cpu_seconds(proc.pid) for proc in self._procs)
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)  # wrk stops and reports
        results = []
        try:
            for proc in self._procs:
                out, err = proc.communicate(timeout=30)
                lines = [line for line in out.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"wrk failed ({proc.returncode}): {err[-2000:]}")
                results.append(orjson.loads(lines[-1]))
        finally:
            self.kill()
        if any(r["non_2xx"] or r["socket_errors"] for r in results):
            raise RuntimeError(f"polls were refused or failed: {results}")
        self.p50_ms = statistics.median(r["p50_us"] for r in results) / 1000
        self.rate_hz = sum(r["requests"] / (r["duration_us"] / 1e6) for r in results)
        return sum(int(r["requests"]) for r in results)


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
