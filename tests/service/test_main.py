"""``python -m service`` as the production command runs it: several server processes."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import httpx

from service.__main__ import GRACEFUL_SHUTDOWN_S
from service.store.engines import make_engine, make_sessionmaker
from tests.records import PARAMS, FakeTraining
from tests.support import (
    PROMTOOL,
    api_process,
    api_server,
    promtool_problems,
    service_env,
    wait_for,
)


def test_the_api_serves_from_several_processes(sqlite_url: str, tmp_path: Path) -> None:
    env = service_env(
        database_url=sqlite_url,
        checkpoint_dir=str(tmp_path / "models"),
        api_workers="2",
        access_log="false",
    )
    log = tmp_path / "api.log"
    with api_server(env, log) as client:
        created = client.post("/jobs", json={"seed": 1})
        assert created.status_code == 202
        # Any process answers: they share the database, not memory.
        for _ in range(4):
            assert client.get(created.headers["location"]).json()["id"] == created.json()["id"]
        # Each process has the edge's limits (service/api/edge/), not uvicorn's bare protocol.
        assert client.get("/healthz", headers={"X-Big": "b" * 40_000}).status_code == 431
    text = log.read_text()
    assert text.count("Started server process") >= 2, text
    assert "GET /jobs/" not in text  # no access log


# Imported by every process the test starts: the first import of torch there takes 7 s more,
# as it may on a loaded host, past the 5 s in which uvicorn's supervisor wants its new child
# to answer a health check.
SLOW_TORCH = """
import sys, time

class SlowTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            time.sleep(7)
        return None

sys.meta_path.insert(0, SlowTorch())
"""


def test_server_processes_slow_to_import_torch_are_not_killed_as_hung(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Each child imported the app, and torch with it, before it could answer the health
    check: on a loaded host it was killed as hung, and each replacement too, for good (seen
    in the suite with other work on the machine)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_TORCH)
    env = service_env(
        database_url=sqlite_url, checkpoint_dir=str(tmp_path / "models"), api_workers="2"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))
    log = tmp_path / "api.log"
    with api_server(env, log) as client:
        assert client.get("/healthz").status_code == 200
    text = log.read_text()
    assert text.count("Started server process") == 2 and "died" not in text, text


def _total(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[2])
    return total


def _gauge(text: str, name: str, labels: str = "") -> float:
    """The one sample of an unlabelled gauge (or of one label set): exactly one is shown."""
    found = re.findall(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert len(found) == 1, f"{name}{labels}: {found} in\n{text}"
    return float(found[0])


def test_every_scrape_counts_the_requests_of_every_process(sqlite_url: str, tmp_path: Path) -> None:
    env = service_env(
        database_url=sqlite_url,
        checkpoint_dir=str(tmp_path / "models"),
        api_workers="2",
        access_log="false",
    )
    with (
        api_server(env, tmp_path / "api.log") as client,
        # A fresh connection per request: the kernel hands each to either process.
        httpx.Client(base_url=client.base_url, headers={"connection": "close"}) as fresh,
    ):
        for _ in range(3):
            assert fresh.post("/jobs", json={}).status_code == 202
        for _ in range(100):
            assert fresh.get("/jobs").status_code == 200
        for scrape in range(5):
            text = fresh.get("/metrics").text
            requests = "mnist_http_requests_total"
            assert _total(text, requests, method="GET", route="/jobs") == 100
            assert _total(text, requests, method="GET", route="/jobs", status="200") == 100
            assert _total(text, requests, method="POST", route="/jobs", status="202") == 3
            # A scrape is counted once answered: the one before may be a moment behind.
            assert _total(text, requests, route="/metrics") in (scrape - 1, scrape)
            latency = "mnist_http_request_duration_seconds_count"
            assert _total(text, latency, method="GET", route="/jobs") == 100
            # The database's gauges: one answer, not one per process nor their sum.
            assert _gauge(text, "mnist_jobs", '{status="queued"}') == 3
            assert _gauge(text, "mnist_queue_depth") == 3
            assert _gauge(text, "mnist_workers_live") == 0
            assert _gauge(text, "mnist_database_up") == 1
            # Added up from the processes' files: no ``_created`` series there either.
            assert "_created" not in text
            if PROMTOOL is not None:  # where it is installed (CI installs it)
                assert promtool_problems(text) == ""


def test_an_open_event_stream_does_not_hold_the_apis_stop(sqlite_url: str, tmp_path: Path) -> None:
    """A stream lasts as long as its job: uvicorn waited for it to close, for good (one open
    dashboard tab on a running job), until the supervisor killed the API."""
    env = service_env(database_url=sqlite_url, checkpoint_dir=str(tmp_path / "models"))
    log = tmp_path / "api.log"
    engine = make_engine(sqlite_url)
    training = FakeTraining(make_sessionmaker(engine), PARAMS.model_copy(update={"epochs": 100}))
    stop = threading.Event()

    def train() -> None:  # steps keep coming, as from a worker, until the test ends
        while not stop.wait(0.05):
            training.advance(1)

    trainer = threading.Thread(target=train, daemon=True)
    try:
        with api_process(env, log) as (proc, client):
            training.submit()
            training.claim()
            trainer.start()
            with client.stream("GET", f"/jobs/{training.job_id}/events", timeout=60) as stream:
                lines = stream.iter_lines()
                wait_for(lambda: '"steps"' in next(lines), timeout_s=30, what="a step event")
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=GRACEFUL_SHUTDOWN_S + 20)
    finally:
        stop.set()
        trainer.join(timeout=10)
        engine.dispose()
    assert code in (0, -signal.SIGTERM), log.read_text()  # uvicorn re-raises the signal
