"""With real processes, both databases: an idle API and an idle worker sleep until something
happens, instead of waking several times a second to look at a flag.

What the goal counts is CPU (an idle worker or API costs ≤ 1% of a core, `make bench`), and what
an idle wake costs depends on the host (milliseconds where an idle process's memory goes cold
between wakes, docs/benchmarks.md). So the test counts the wakes themselves: each thread's
voluntary context switches, summed over the process. uvicorn's main loop woke 10 times a second,
and so did the worker's wait for a job (to look at its stop flag) and, on PostgreSQL, each
process's listening thread (psycopg's own wait).
"""

from __future__ import annotations

import signal
from pathlib import Path

from service.api.edge.server import TICK_S
from tests.support import api_process, children_of, local_env, process, wait_for, wakes_over

WINDOW_S = 4.0
# The wakes allowed in the window: a heartbeat's statements, a listener's timeout (5 s, SQLite's
# sockets). The old loops alone made 40 per process.
MOST_WAKES = 12
# ...for each API process under uvicorn's supervisor, which pings each twice a second: 8 wakes
# of the child's answering thread (the old loops: 48).
MOST_CHILD_WAKES = 20


def test_an_idle_api_and_worker_sleep(db_url: str, small_mnist: Path, tmp_path: Path) -> None:
    # No look without a wake-up within the window (the worker's fallback is its own setting).
    env = local_env(db_url, small_mnist, tmp_path, torch_threads="1", poll_interval_s="60")
    worker_log = tmp_path / "worker.log"
    with (
        api_process(env, tmp_path / "api.log") as (api, client),
        process(["-m", "workers"], env, worker_log) as worker,
    ):
        wait_for(
            lambda: "ready on" in worker_log.read_text(),
            timeout_s=120,
            what="the worker to be ready (it then looks at the empty queue once)",
        )
        wait_for(
            lambda: client.get("/workers").json()["workers"] or None,
            timeout_s=30,
            what="the worker to register",
        )
        client.close()  # nothing asks the API anything from here on
        woke = wakes_over([api.pid, worker.pid], WINDOW_S)
        assert api.poll() is None and worker.poll() is None
    assert woke[api.pid] <= MOST_WAKES, f"the idle API woke {woke[api.pid]} times in {WINDOW_S} s"
    assert woke[worker.pid] <= MOST_WAKES, (
        f"the idle worker woke {woke[worker.pid]} times in {WINDOW_S} s"
    )


def test_each_of_several_api_processes_sleeps(
    db_url: str, small_mnist: Path, tmp_path: Path
) -> None:
    """With MNIST_API_WORKERS=2, uvicorn's supervisor makes the children, which serve with the
    quiet server too."""
    env = local_env(db_url, small_mnist, tmp_path, api_workers="2")
    log = tmp_path / "api.log"
    with api_process(env, log) as (api, client):
        client.close()
        wait_for(  # one answered /healthz; the other may still be starting
            lambda: log.read_text().count("Application startup complete.") == 2,
            timeout_s=60,
            what="both API processes to start",
        )
        servers = [pid for pid, cmd in children_of(api.pid).items() if "spawn_main" in str(cmd)]
        assert len(servers) == 2
        woke = wakes_over(servers, WINDOW_S)
    assert max(woke.values()) <= MOST_CHILD_WAKES, f"wakes in {WINDOW_S} s: {woke}"


def test_a_stopped_idle_worker_leaves_at_once(
    db_url: str, small_mnist: Path, tmp_path: Path
) -> None:
    """Its wait for a job ends with the signal, not at a look at the flag."""
    env = local_env(db_url, small_mnist, tmp_path, torch_threads="1", poll_interval_s="60")
    worker_log = tmp_path / "worker.log"
    with process(["-m", "workers"], env, worker_log) as worker:
        wait_for(lambda: "ready on" in worker_log.read_text(), timeout_s=120, what="ready")
        worker.terminate()
        assert worker.wait(timeout=30) == 0
    assert "stopped" in worker_log.read_text()


def test_an_idle_api_stops_at_a_signal(db_url: str, small_mnist: Path, tmp_path: Path) -> None:
    """The server sleeps up to TICK_S between its ticks; a signal wakes it to stop at once."""
    env = local_env(db_url, small_mnist, tmp_path)
    with api_process(env, tmp_path / "api.log") as (api, client):
        client.get("/healthz").raise_for_status()
        client.close()
        api.terminate()
        # Well within a tick. uvicorn shuts down gracefully, then raises the signal again.
        assert api.wait(timeout=TICK_S / 3) == -signal.SIGTERM
    assert "Finished server process" in (tmp_path / "api.log").read_text()


def test_the_date_header_moves_with_the_clock(
    db_url: str, small_mnist: Path, tmp_path: Path
) -> None:
    """Refreshed as requests come, no longer by a tick of the server's own."""
    env = local_env(db_url, small_mnist, tmp_path)
    with api_process(env, tmp_path / "api.log") as (_api, client):
        first = client.get("/healthz").headers["date"]
        wait_for(
            lambda: client.get("/healthz").headers["date"] != first,
            timeout_s=10,
            what="the Date header to change",
        )
