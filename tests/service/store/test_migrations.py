"""The migrations build exactly the ORM's schema, on both backends, and can be undone; the
service's own configuration (no alembic.ini) finds them in a checkout from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from service.store import migrations
from service.store.engines import make_engine
from service.store.tables import Base
from tests.conftest import OwnPostgres
from tests.support import REPO_ROOT, stamp_revision

# A succeeded job's row in the columns every revision from 0002 on has.
INSERT_ENDED_JOB = text(
    "INSERT INTO jobs (id, status, epochs, batch_size, learning_rate, trainset_size, "
    "testset_size, created_at, epoch, step, total_steps, attempt, max_attempts, "
    "cancel_requested, resume_epoch) VALUES "
    "(:id, 'succeeded', 1, 64, 0.001, 64, 10, :now, 1, 1, 1, 1, 1, false, 0)"
)


def config_for(url: str) -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    return config


def test_head_matches_the_models_and_downgrades_cleanly(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        assert {"jobs", "train_steps", "epoch_metrics", "workers", "model_aliases"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


def test_downgrade_to_base_and_back(sqlite_url: str) -> None:
    config = config_for(sqlite_url)
    command.downgrade(config, "base")
    engine = make_engine(sqlite_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        command.upgrade(config, "head")
        inspector = inspect(engine)
        assert "resume_checkpoint" in {c["name"] for c in inspector.get_columns("jobs")}
    finally:
        engine.dispose()


def counts(url: str, tables: tuple[str, ...]) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}
    finally:
        engine.dispose()


def test_a_sqlite_downgrade_keeps_the_rows_of_every_table_it_keeps(sqlite_url: str) -> None:
    """Batch mode copies ``jobs`` and drops the old table (0006's and 0002's downgrades): with
    the service's foreign keys on, that drop cascaded to every step, epoch, alias and artifact.
    The migrations run with them off, their references checked before committing."""
    engine = make_engine(sqlite_url)
    now = datetime(2026, 1, 1)
    try:
        with engine.begin() as conn:
            conn.execute(
                INSERT_ENDED_JOB,
                {"id": "a" * 32, "now": now},
            )
            for statement in (
                "INSERT INTO train_steps (job_id, step, epoch, loss, examples_seen) "
                "VALUES (:id, 1, 1, 0.5, 64)",
                "INSERT INTO epoch_metrics (job_id, epoch, accuracy, examples_seen) "
                "VALUES (:id, 1, 0.9, 64)",
                "INSERT INTO model_aliases (name, job_id, updated_at) VALUES ('prod', :id, :now)",
                "INSERT INTO artifacts (name, job_id, kind, attempt, size_bytes, data, "
                "created_at) VALUES ('w', :id, 'weights', 1, 1, x'00', :now)",
            ):
                conn.execute(text(statement), {"id": "a" * 32, "now": now})
    finally:
        engine.dispose()
    kept = ("jobs", "train_steps", "epoch_metrics", "model_aliases", "artifacts")
    config = config_for(sqlite_url)
    command.downgrade(config, "0005")
    assert counts(sqlite_url, kept) == dict.fromkeys(kept, 1)
    command.downgrade(config, "0001")  # aliases and artifacts go with their tables
    assert counts(sqlite_url, kept[:3]) == dict.fromkeys(kept[:3], 1)
    command.upgrade(config, "head")
    assert counts(sqlite_url, kept[:3]) == dict.fromkeys(kept[:3], 1)


def test_the_service_migrates_from_a_checkout_without_alembic_ini(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no alembic.ini here
    assert migrations.script_location() == REPO_ROOT / "alembic"
    ini_heads = ScriptDirectory.from_config(config_for("sqlite://")).get_heads()
    assert migrations.head_revisions() == frozenset(ini_heads)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert migrations.current_revisions(conn) == migrations.head_revisions()
        assert "model_aliases" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert list(tmp_path.iterdir()) == [tmp_path / "fresh.db"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_sweeps_migration_keeps_every_job_and_its_steps(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """0006 adds ``jobs.sweep_id`` in place: on SQLite a batch copy of ``jobs`` would drop the
    old table, and with foreign keys on that drop would cascade to every step."""
    url = (
        request.getfixturevalue("sqlite_url")
        if backend == "sqlite"
        else request.getfixturevalue("own_postgres").url
    )
    config = config_for(url)
    command.downgrade(config, "0005")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                INSERT_ENDED_JOB,
                {"id": "a" * 32, "now": datetime(2026, 1, 1)},
            )
            conn.execute(
                text(
                    "INSERT INTO train_steps (job_id, step, epoch, loss, examples_seen) "
                    "VALUES (:id, 1, 1, 0.5, 64)"
                ),
                {"id": "a" * 32},
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM train_steps")).scalar_one() == 1
            assert conn.execute(text("SELECT sweep_id FROM jobs")).all() == [(None,)]
    finally:
        engine.dispose()


def storage_of_artifact_bytes(conn: Connection) -> str:
    """PostgreSQL's storage strategy of ``artifacts.data`` (x: extended, e: external)."""
    return str(
        conn.execute(
            text(
                "SELECT attstorage FROM pg_attribute "
                "WHERE attrelid = 'artifacts'::regclass AND attname = 'data'"
            )
        ).scalar_one()
    )


def test_postgresql_stores_artifacts_uncompressed_and_the_migration_undoes(
    own_postgres: OwnPostgres,
) -> None:
    """0007: a state's float32 bytes do not compress; trying cost the server ~12 ms a state."""
    config = config_for(own_postgres.url)
    engine = make_engine(own_postgres.url)
    try:
        with engine.connect() as conn:
            assert storage_of_artifact_bytes(conn) == "e"
        command.downgrade(config, "0006")
        with engine.connect() as conn:
            assert storage_of_artifact_bytes(conn) == "x"
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert storage_of_artifact_bytes(conn) == "e"
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_lose_their_unread_job_id_and_keep_their_rows(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """0008: nothing read ``workers.job_id``; dropping it (a table rebuilt on SQLite) keeps
    every worker's row, and undoing it brings the column back, empty. On a database of the
    test's own: it moves the schema."""
    db_url: str = (
        request.getfixturevalue("sqlite_url")
        if backend == "sqlite"
        else request.getfixturevalue("own_postgres").url
    )
    config = config_for(db_url)
    engine = make_engine(db_url)
    now = datetime(2026, 12, 2, 12, 0, 0)
    row = {"id": "w1", "host": "h", "pid": 7, "device": "cpu", "started_at": now, "beat": now}
    try:
        command.downgrade(config, "0007")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO workers (id, host, pid, device, started_at, heartbeat_at) "
                    "VALUES (:id, :host, :pid, :device, :started_at, :beat)"
                ),
                row,
            )
        command.upgrade(config, "head")
        assert "job_id" not in {c["name"] for c in inspect(engine).get_columns("workers")}
        with engine.connect() as conn:
            kept = conn.execute(text("SELECT id, host, pid, device FROM workers")).all()
        assert [tuple(r) for r in kept] == [("w1", "h", 7, "cpu")]
        command.downgrade(config, "0007")
        engine.dispose()  # a fresh look at the table
        assert "job_id" in {c["name"] for c in inspect(engine).get_columns("workers")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT job_id FROM workers")).all() == [(None,)]
        command.upgrade(config, "head")
    finally:
        engine.dispose()


def test_migrations_run_at_once_on_postgresql_take_turns(own_postgres: OwnPostgres) -> None:
    """Two hosts' start-up scripts migrating one database at once: each created the same types
    and tables, and one failed (UniqueViolation). An advisory lock makes them take turns: the
    second finds nothing to do."""
    command.downgrade(config_for(own_postgres.url), "base")
    code = "import sys; from service.store import migrations; migrations.upgrade(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code, own_postgres.url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=120)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    engine = make_engine(own_postgres.url)
    try:
        with engine.connect() as conn:
            assert migrations.current_revisions(conn) == migrations.head_revisions()
    finally:
        engine.dispose()


def test_a_schema_not_at_the_head_is_named_with_what_to_run(sqlite_url: str) -> None:
    config = config_for(sqlite_url)
    assert migrations.startup_problem(sqlite_url) is None
    command.downgrade(config, "0005")
    assert migrations.startup_problem(sqlite_url) == (
        f"database at 0005, code expects {', '.join(sorted(migrations.head_revisions()))}: "
        "run `mnist-service migrate`"
    )
    stamp_revision(sqlite_url, "0099")
    problem = migrations.startup_problem(sqlite_url)
    assert problem is not None and "0099, which this code does not know" in problem
    command.stamp(config, "base", purge=True)
    assert migrations.startup_problem(sqlite_url) == (
        "the database has no schema yet: run `mnist-service migrate`"
    )


def test_a_database_out_of_reach_is_no_schema_problem() -> None:
    """A process starting through an outage starts (and waits for the database)."""
    assert migrations.startup_problem("postgresql+psycopg://postgres@127.0.0.1:1/x") is None


def test_a_start_refused_for_a_missing_sqlite_file_makes_nothing(tmp_path: Path) -> None:
    """It opened the file to find no schema: an empty file, and its folders wherever a typo
    pointed (as root, under /), on every refused start."""
    database = tmp_path / "typo" / "deep" / "mnist.db"
    assert migrations.startup_problem(f"sqlite:///{database}") == migrations.NO_SCHEMA
    assert not (tmp_path / "typo").exists()
