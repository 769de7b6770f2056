"""The service under test: a fresh database (SQLite or PostgreSQL) and ``mnist-service run
--workers 1`` on it, with its processes' ids for their CPU time."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url

from benchmarks.env import REPO_ROOT
from benchmarks.procs import children, cpu_seconds
from service.store.engines import make_engine
from tests.support import free_port, process_cmd, service_env, wait_for

POSTGRES_ADMIN_ENV = "MNIST_TEST_POSTGRES_URL"
POSTGRES_ADMIN_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
READY = re.compile(r"worker (\S+) ready")
# workers.worker.log_claims: a first attempt's claim, committed, and its wait since created_at.
CLAIMED = re.compile(
    r"claimed job ([0-9a-f]{32}) attempt 1\b.*?, (-?[\d.]+) ms after it was created"
)
# workers.endings: a job's end, with its steps by the thread count the tuner held (Reporter),
# where a tuner chose them.
SUCCEEDED = re.compile(r"job ([0-9a-f]{32}) succeeded(?:; steps by thread count: ([\d:, ]+))?")
LOGGED_WITHIN_S = 30.0  # for the worker to log a job's end once the client has seen it


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    """A migrated database of this run's own: a SQLite file, or a PostgreSQL database
    created on the server at MNIST_TEST_POSTGRES_URL (else 127.0.0.1:5432) and dropped."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        url = f"sqlite:///{root / 'mnist.db'}"
        _migrate(url)
        yield url
        return
    admin = make_engine(
        os.environ.get(POSTGRES_ADMIN_ENV, POSTGRES_ADMIN_DEFAULT), isolation_level="AUTOCOMMIT"
    )
    name = f"mnist_bench_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(admin.url).set(database=name).render_as_string(hide_password=False)
            _migrate(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _migrate(url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"],
        cwd=REPO_ROOT,
        env=service_env(database_url=url),
        check=True,
        capture_output=True,
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass(frozen=True)
class Running:
    """``mnist-service run --workers 1``: a client of its API and its processes' ids."""

    client: httpx.Client
    pids: dict[str, int]  # "supervisor", "API", "worker"


@contextlib.contextmanager
def service(url: str, root: Path, data: Path, **settings: str) -> Iterator[Running]:
    """The API and one worker as the README runs them, until the block ends; ``settings``
    are more MNIST_* settings (``pack_max="1"``)."""
    port = free_port()
    env = service_env(
        database_url=url,
        data_dir=str(data),
        checkpoint_dir=str(root / "models"),
        device="cpu",
        host="127.0.0.1",
        port=str(port),
        access_log="false",
        **settings,
    )
    log = root / "service.log"
    # The console script's own entry point, through the interpreter: the same command where the
    # project is not installed (a lent machine runs the checkout with carried packages).
    command = [sys.executable, "-m", "service.cli", "run", "--workers", "1"]
    with (
        process_cmd(command, env, log, stop_timeout_s=30) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited:\n{log.read_text()[-3000:]}")
            if not READY.search(log.read_text()):
                return False
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout_s=120, what="the API and the worker to be ready")
        pids = {"supervisor": proc.pid}
        for pid in children(proc.pid):
            cmd = _cmdline(pid)
            if "-m workers" in cmd:
                pids["worker"] = pid
            elif "-m service" in cmd:
                pids["API"] = pid
        yield Running(client, pids)


def database_server_pid(url: str) -> int | None:
    """The postmaster of the PostgreSQL server at ``url`` when it runs on this machine and its
    data directory can be read here (its ``postmaster.pid``), so that its processes' CPU can be
    counted; None for SQLite (no server) and otherwise."""
    if make_url(url).get_backend_name() != "postgresql":
        return None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            data_dir = str(conn.execute(text("SHOW data_directory")).scalar_one())
    finally:
        engine.dispose()
    try:
        pid = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def logged_claims(root: Path) -> dict[str, float]:
    """Each first attempt's claim latency in milliseconds, by job id, as the worker logged it
    (its clock once the claim committed, against the API's ``created_at``) in the log of
    :func:`service` run with ``root``."""
    text = (root / "service.log").read_text()
    return {job_id: float(ms) for job_id, ms in CLAIMED.findall(text)}


def logged_thread_counts(root: Path) -> dict[str, dict[int, int]]:
    """Each succeeded job's steps by the thread count they ran at, by job id, as the worker
    logged them in the log of :func:`service` run with ``root`` (empty where the count was
    fixed)."""
    logged: dict[str, dict[int, int]] = {}
    for job_id, tally in SUCCEEDED.findall((root / "service.log").read_text()):
        pairs = (part.split(":") for part in tally.split(",")) if tally else ()
        logged[job_id] = {int(n): int(steps) for n, steps in pairs}
    return logged


def thread_counts_of(root: Path, job_ids: list[str]) -> dict[str, dict[int, int]]:
    """:func:`logged_thread_counts` of ``job_ids``, once the worker has logged each one's end:
    it logs it after the job's row says ``succeeded``, which a client may see first."""

    def all_logged() -> dict[str, dict[int, int]] | None:
        logged = logged_thread_counts(root)
        return logged if logged.keys() >= set(job_ids) else None

    return wait_for(
        all_logged, timeout_s=LOGGED_WITHIN_S, what=f"the worker to log the end of jobs {job_ids}"
    )


def idle_shares(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process's CPU over ``seconds`` of doing nothing, as a share of one core."""
    before = {name: cpu_seconds(pid, with_children=False) for name, pid in pids.items()}
    started = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - started
    return {
        name: (cpu_seconds(pid, with_children=False) - before[name]) / wall
        for name, pid in pids.items()
    }


def databases_here() -> tuple[list[str], str | None]:
    """The databases a benchmark measures here: SQLite, and PostgreSQL when its server
    answers; else why not."""
    why_not = postgres_reachable()
    return (["sqlite"] if why_not is not None else ["sqlite", "postgresql"]), why_not


def postgres_reachable() -> str | None:
    """None when the PostgreSQL server answers, else why not."""
    engine = make_engine(os.environ.get(POSTGRES_ADMIN_ENV, POSTGRES_ADMIN_DEFAULT))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: not measured here
        return f"{type(exc).__name__}"
    finally:
        engine.dispose()
