"""A real API (``python -m service``) through database outages, on both databases.

While the database is away the API keeps answering ``/healthz``; ``/readyz`` and every
request that needs the database get 503 with ``Retry-After`` in the service's envelope (never
a 500); an open event stream stays open; and all of it recovers without a restart.

- PostgreSQL: the test's own database refuses connections (``ALLOW_CONNECTIONS false`` and
  every backend terminated, as a restart or a failover does), then turns read-only and back
  (its open connections left as they are), then another session locks the jobs table, with
  and without a ``statement_timeout``.
- SQLite, unwritable: the API process may no longer write a byte to any file (its
  ``RLIMIT_FSIZE`` set to 0 from outside: what a full disk or an exceeded quota looks like to
  it); reads go on.
- SQLite, unreadable: the API starts while the database's path is no database (a folder, as
  when a volume is not mounted yet), and the file then appears.
"""

from __future__ import annotations

import io
import re
import resource
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sqlalchemy import text

from service import sse
from service.errors import RETRY_AFTER_S
from service.store.engines import make_engine
from tests.conftest import OwnPostgres, refused, terminate_backends
from tests.support import api_process, service_env, wait_for

DEADLINE_S = 20.0
RECOVERED_REQUESTS = 20  # after an outage, every one of these must succeed (no stale connection)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_unavailable(response: httpx.Response, code: str = "database_unavailable") -> None:
    """503, Retry-After, and the service's envelope."""
    request = response.request
    assert response.status_code == 503, (request.method, request.url, response.text)
    assert response.headers["retry-after"] == str(RETRY_AFTER_S)
    assert response.json()["error"]["code"] == code


def ready(client: httpx.Client) -> bool:
    return client.get("/readyz").status_code == 200


def not_ready(client: httpx.Client) -> httpx.Response | None:
    response = client.get("/readyz")
    return response if response.status_code == 503 else None


def assert_recovered(client: httpx.Client, job_id: str) -> None:
    """Every request answers again, the first one after the outage included."""
    statuses = [client.get("/jobs").status_code for _ in range(RECOVERED_REQUESTS)]
    statuses += [client.get(f"/jobs/{job_id}/metrics").status_code for _ in range(5)]
    statuses += [client.get(f"/jobs/{job_id}").status_code for _ in range(5)]
    assert statuses == [200] * len(statuses)
    assert client.post("/jobs", json={}).status_code == 202


@dataclass
class StreamReader:
    """Reads a job's event stream in a thread, line by line, until it ends."""

    client: httpx.Client
    job_id: str
    lines: list[str] = field(default_factory=list)
    status: int | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> StreamReader:
        def read() -> None:
            try:
                path = f"/jobs/{self.job_id}/events"
                with self.client.stream("GET", path, timeout=60) as response:
                    self.status = response.status_code
                    for line in response.iter_lines():
                        self.lines.append(line)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error = exc

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        wait_for(lambda: bool(self.lines), timeout_s=DEADLINE_S, what="the stream's first line")
        return self

    def finished(self) -> list[sse.Event]:
        assert self.thread is not None
        self.thread.join(timeout=DEADLINE_S)
        assert not self.thread.is_alive(), "the stream did not end with the job"
        assert self.error is None and self.status == 200, (self.error, self.status)
        return list(sse.parse(self.lines))


def check_outage(client: httpx.Client, job_id: str) -> None:
    """What a client meets while the database is away."""
    assert client.get("/healthz").status_code == 200
    assert client.head("/healthz").status_code == 200
    readiness = wait_for(lambda: not_ready(client), timeout_s=DEADLINE_S, what="/readyz 503")
    assert_unavailable(readiness, code="not_ready")
    assert client.head("/readyz").status_code == 503
    assert_unavailable(client.get("/jobs"))
    assert_unavailable(client.get(f"/jobs/{job_id}"))
    assert_unavailable(client.get(f"/jobs/{job_id}/metrics"))  # the polls' lane, then the route
    assert_unavailable(client.get(f"/jobs/{job_id}/events"))  # refused before it opens
    assert_unavailable(client.post("/jobs", json={}))
    assert_unavailable(client.get("/models"))
    predict = client.post("/predict", content=png(), headers={"content-type": "image/png"})
    assert_unavailable(predict)  # predict's lane, then the route
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "mnist_database_up 0.0" in metrics.text
    for stale in ("mnist_jobs", "mnist_queue_depth", "mnist_workers_live", "mnist_store_bytes"):
        assert f"\n{stale}" not in metrics.text, stale  # not as they stood before the outage


def check_log(log: Path, outages: int = 1) -> None:
    """No error beyond the outages, each logged as it started and as it ended, one after the
    other. At least ``outages``: how an induced outage unfolds is the server's race, not the
    test's (between PostgreSQL refusing new connections and its open ones being cut, a request
    on an open one still succeeds, and the API rightly logs the database back and then gone
    again), so more episodes may be logged than outages were made."""
    text = log.read_text()
    assert "Traceback" not in text and "unhandled error" not in text, text[-3000:]
    episodes = re.findall(
        r"database (unreachable) \(.+\); answering 503 with Retry-After until it is back"
        r"|database is (back) after \d+\.\d s",
        text,
    )
    said = ["".join(pair) for pair in episodes]
    assert said[::2] == ["unreachable"] * len(said[::2]), said  # a start, then its end...
    assert said[1::2] == ["back"] * len(said[1::2]), said
    assert len(said) % 2 == 0 and len(said) // 2 >= outages, (said, text[-3000:])


def test_postgres_refusing_connections_then_read_only(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    url, admin, name = own_postgres
    env = service_env(database_url=url, checkpoint_dir=str(tmp_path / "models"))
    log = tmp_path / "api.log"
    with api_process(env, log) as (_proc, client):
        job_id = client.post("/jobs", json={}).json()["id"]
        assert client.get(f"/jobs/{job_id}/metrics").status_code == 200
        wait_for(lambda: ready(client), timeout_s=DEADLINE_S, what="/readyz 200")
        stream = StreamReader(client, job_id).start()
        # A blip between two requests (a restart): the pooled connections are dead, and the
        # very next requests must still be answered (pool_pre_ping replaces them).
        terminate_backends(admin, name)
        assert_recovered(client, job_id)

        assert "\nmnist_queue_depth " in client.get("/metrics").text  # read while it is up
        # Down: no new connection, and every open one cut.
        with refused(admin, name):
            check_outage(client, job_id)
        wait_for(lambda: ready(client), timeout_s=DEADLINE_S, what="/readyz 200 after the outage")
        assert_recovered(client, job_id)

        # Read-only (a replica, or default_transaction_read_only): reads go on, writes and
        # readiness fail; then writable again. Each change reaches new connections only: the
        # API's connections found read-only are replaced (they refused writes for good).
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        terminate_backends(admin, name)
        readiness = wait_for(lambda: not_ready(client), timeout_s=DEADLINE_S, what="/readyz 503")
        assert "writes: failing" in readiness.json()["error"]["message"]
        assert client.get("/jobs").status_code == 200
        assert_unavailable(client.post("/jobs", json={}))
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        wait_for(lambda: ready(client), timeout_s=DEADLINE_S, what="/readyz 200 when writable")
        wait_for(
            lambda: client.post("/jobs", json={}).status_code == 202,
            timeout_s=DEADLINE_S,
            what="writes when writable",
        )
        assert_recovered(client, job_id)

        # Another session holds the jobs table (a DBA's LOCK TABLE, a migration): requests that
        # read it answer 503 once they have waited REQUEST_LOCK_WAIT_S, rather than wait as
        # long as the lock; then all is well again.
        def behind_a_lock_on_jobs() -> None:
            locking = make_engine(url)
            try:
                with locking.begin() as conn:
                    conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = '40s'"))
                    conn.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
                    assert_unavailable(client.get(f"/jobs/{job_id}"))
                    assert_unavailable(client.get("/jobs"))
            finally:
                locking.dispose()
            assert_recovered(client, job_id)

        behind_a_lock_on_jobs()
        # The same with a statement_timeout the database was given: the statements are
        # cancelled (57014) before the lock's wait is over, and that too is a 503, not a 500.
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE \"{name}\" SET statement_timeout = '100ms'"))
        terminate_backends(admin, name)
        behind_a_lock_on_jobs()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RESET statement_timeout'))
        terminate_backends(admin, name)
        wait_for(lambda: ready(client), timeout_s=DEADLINE_S, what="/readyz 200 after it")
        assert_recovered(client, job_id)

        # The stream opened before it all is still there, and still follows the job.
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
        received = stream.finished()
    assert received[-1].json()["status"] == "cancelled" and received[-1].json()["final"]
    check_log(log, outages=2)


def set_file_size_limit(pid: int, limit: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_sqlite_unwritable_then_writable(sqlite_template: Path, tmp_path: Path) -> None:
    database = tmp_path / "mnist.db"
    shutil.copy(sqlite_template, database)
    env = service_env(database_url=f"sqlite:///{database}", checkpoint_dir=str(tmp_path / "m"))
    log = tmp_path / "api.log"  # its lines written during the outage are lost, as on a full disk
    with api_process(env, log) as (proc, client):
        job_id = client.post("/jobs", json={}).json()["id"]
        wait_for(lambda: ready(client), timeout_s=DEADLINE_S, what="/readyz 200")
        set_file_size_limit(proc.pid, 0)
        try:
            readiness = wait_for(
                lambda: not_ready(client), timeout_s=DEADLINE_S, what="/readyz 503"
            )
            assert_unavailable(readiness, code="not_ready")
            assert "writes: failing" in readiness.json()["error"]["message"]
            assert client.get("/healthz").status_code == 200
            assert client.get("/jobs").status_code == 200  # reads go on
            assert client.get(f"/jobs/{job_id}/metrics").status_code == 200
            assert_unavailable(client.post("/jobs", json={}))
            assert_unavailable(client.post(f"/jobs/{job_id}/cancel"))
        finally:
            set_file_size_limit(proc.pid, resource.RLIM_INFINITY)
        wait_for(lambda: ready(client), timeout_s=DEADLINE_S, what="/readyz 200 when writable")
        assert_recovered(client, job_id)
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200


def test_sqlite_unreadable_until_the_file_appears(sqlite_template: Path, tmp_path: Path) -> None:
    database = tmp_path / "mnist.db"
    database.mkdir()  # no database there yet: SQLite cannot open a folder
    env = service_env(database_url=f"sqlite:///{database}", checkpoint_dir=str(tmp_path / "m"))
    log = tmp_path / "api.log"
    job_id = "0" * 32
    with api_process(env, log) as (_proc, client):
        check_outage(client, job_id)
        database.rmdir()
        shutil.copy(sqlite_template, database)
        wait_for(lambda: ready(client), timeout_s=DEADLINE_S, what="/readyz 200 once the file is")
        job_id = client.post("/jobs", json={}).json()["id"]
        assert_recovered(client, job_id)
    check_log(log)
