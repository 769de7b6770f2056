"""Fixtures: migrated databases (SQLite always, PostgreSQL when configured), MNIST data."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, cast

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.settings import ArtifactStore, Settings
from service.store.engines import make_engine, make_sessionmaker
from tests.support import REPO_ROOT, make_small_mnist

POSTGRES_ENV = "MNIST_TEST_POSTGRES_URL"
DATA_ENV = "MNIST_DATA_DIR"
TABLES = (
    "train_steps",
    "epoch_metrics",
    "artifacts",
    "model_aliases",
    "workers",
    "jobs",
    "sweeps",
    "housekeeping",
)


def migrate(url: str) -> None:
    """Build the schema the only way the app knows: ``alembic upgrade head``."""
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The root logger as it was, after every test.

    ``configure_logging`` (the entry points that some tests run in-process) gives the root a
    handler bound to the ``sys.stderr`` of that moment, a test's capture, and sets INFO: left
    in place, every later test's records (httpx's request lines) reach a closed stream, and
    "--- Logging error ---" lands in whatever a later test reads from its stderr.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file migrated to head per test session; tests get copies of it."""
    path = tmp_path_factory.mktemp("db") / "template.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database migrated to head, dropped after the session."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"
        )
    name = f"mnist_test_{secrets.token_hex(4)}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means: no server here
        admin.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_ENV} is not reachable: {exc}")
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class OwnPostgres(NamedTuple):
    """A PostgreSQL database of one test's own: its URL, and the admin engine and name that
    take it away (:func:`refused`, :func:`terminate_backends`)."""

    url: str
    admin: Engine
    name: str


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL database of this test's own, migrated, for tests that take it away (an
    outage); dropped afterwards, even while it refuses connections."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV}")
    name = f"mnist_outage_{secrets.token_hex(4)}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        migrate(url)
        yield OwnPostgres(url, admin, name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def terminate_backends(admin: Engine, name: str) -> None:
    """Cut every open connection to database ``name`` (as a restart or a failover does)."""
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )


@contextmanager
def refused(admin: Engine, name: str) -> Iterator[None]:
    """PostgreSQL refuses every connection to ``name`` and drops the open ones, until exit."""
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
    terminate_backends(admin, name)
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    """A migrated, empty database of each backend; emptied again after the test."""
    if request.param == "sqlite":
        path = tmp_path / "mnist.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
        return
    url: str = request.getfixturevalue("postgres_url")
    yield url
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A migrated, empty SQLite database for tests that need only one backend."""
    path = tmp_path / "mnist.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on :func:`db_url`."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    """Write sessions on :func:`db_url`."""
    return make_sessionmaker(engine)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> ArtifactStore:
    """Where workers write checkpoints (``MNIST_ARTIFACTS``): the default, ``database``, unless
    a test is marked ``BOTH_STORES`` (tests/support.py), which runs it each way."""
    return cast(ArtifactStore, getattr(request, "param", "database"))


@pytest.fixture
def settings(db_url: str, small_mnist: Path, tmp_path: Path, artifacts: ArtifactStore) -> Settings:
    """Settings for an in-process app or worker: the test's database, the small data set."""
    return Settings(
        database_url=db_url,
        data_dir=small_mnist,
        download=False,
        checkpoint_dir=tmp_path / "models",
        artifacts=artifacts,
        device="cpu",
        poll_interval_s=0.05,
        flush_interval_s=0.05,
    )


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MNIST (640 train, 200 test images of a learnable pattern) for fast tests."""
    return make_small_mnist(tmp_path_factory.mktemp("small-mnist"))


@pytest.fixture(scope="session")
def medium_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MNIST with 8,000 training images: jobs long enough to interrupt."""
    return make_small_mnist(tmp_path_factory.mktemp("medium-mnist"), train=8000, test=200)


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The official MNIST files named by MNIST_DATA_DIR; skips with the reason when unset."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"real-data test: set {DATA_ENV} to the folder holding MNIST/raw (CI does)")
    root = Path(value).resolve()
    raw = root / "MNIST" / "raw"
    missing = [
        f
        for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte")
        if not (raw / f).exists()
    ]
    if missing:
        pytest.skip(f"real-data test: {DATA_ENV}={value} lacks MNIST/raw/{', '.join(missing)}")
    return root


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (``mount`` needs root: skipped without it), where a
    file can really fill the disk (ENOSPC, SQLite's FULL), unmounted after the test."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write a file in ``folder`` until its filesystem has no byte left; the file."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as fh:
        while len(chunk):
            try:
                fh.write(chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
    return filler


@pytest.fixture
def folder_scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folders listed (``os.scandir``, which ``Path.glob`` lists through too) from here
    to the test's end: how many times deleting jobs read the checkpoint folder."""
    listed: list[str] = []
    scandir = os.scandir

    def counted(path: Any = ".") -> Any:
        listed.append(os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    return listed
