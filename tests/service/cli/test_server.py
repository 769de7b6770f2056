"""``mnist-service run``'s banner: where to look, never the database's password."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from sqlalchemy import text

from service.cli.server import banner
from service.settings import Settings
from service.store import migrations
from service.store.engines import make_engine
from tests.support import run_python, service_env


def test_the_banner_shows_the_database_without_its_password() -> None:
    """It printed the URL whole, and the systemd unit runs this command: the password went to
    the journal (the settings' own errors never print values)."""
    url = "postgresql+psycopg://mnist:S3cretDbPassw0rd@db.internal:5432/mnist"
    text = banner(Settings(database_url=url, port=8123))
    assert "S3cretDbPassw0rd" not in text
    assert "postgresql+psycopg://mnist:***@db.internal:5432/mnist" in text
    assert "dashboard http://127.0.0.1:8123/" in text


def test_run_with_its_port_taken_starts_nothing(sqlite_url: str, tmp_path: Path) -> None:
    """Its workers started and claimed jobs while its API failed to bind, again and again."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = service_env(
            database_url=sqlite_url, checkpoint_dir=str(tmp_path / "m"), port=str(port)
        )
        result = run_python(["-m", "service.cli", "run", "--workers", "1"], env)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "worker-1 started" not in result.stdout + result.stderr


def test_migrate_waits_for_the_workers_whose_schema_it_would_change(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A worker of the older code trained on while the upgrade ran, then failed on a column
    that had changed, its job left running (a review: the systemd unit migrates at every
    start, so upgrading one host did that to the others)."""
    config = migrations.alembic_config(sqlite_url)
    config.attributes["configure_logger"] = False
    command.downgrade(config, "0008")  # the older code's schema
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as connection:
            heard = datetime.now(UTC).replace(tzinfo=None)
            connection.execute(
                text(
                    "INSERT INTO workers (id, host, pid, device, started_at, heartbeat_at)"
                    " VALUES ('old:1:a', 'old', 1, 'cpu', :at, :at)"
                ),
                {"at": heard},
            )
        env = service_env(database_url=sqlite_url, checkpoint_dir=str(tmp_path / "m"))
        refused = run_python(["-m", "service.cli", "migrate"], env)
        assert refused.returncode == 1
        assert "1 worker(s) heard from within MNIST_LEASE_S (old:1:a)" in refused.stderr
        with engine.connect() as connection:
            assert migrations.current_revisions(connection) == {"0008"}  # nothing changed
        forced = run_python(["-m", "service.cli", "migrate", "--force"], env)
        assert forced.returncode == 0, forced.stderr
        with engine.connect() as connection:
            assert migrations.current_revisions(connection) == migrations.head_revisions()
        again = run_python(["-m", "service.cli", "migrate"], env)  # at the head: no question
        assert again.returncode == 0, again.stderr
    finally:
        engine.dispose()


def test_migrate_under_newer_code_still_says_so_with_its_workers_live(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Its workers are newer code's, on newer code's schema: the refusal is that one (exit 2,
    not retried), not a wait for workers to stop (1, retried for good by systemd)."""
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999_newer'"))
            connection.execute(
                text(
                    "INSERT INTO workers (id, host, pid, device, started_at, heartbeat_at)"
                    " VALUES ('new:1:a', 'new', 1, 'cpu', :at, :at)"
                ),
                {"at": datetime.now(UTC).replace(tzinfo=None)},
            )
    finally:
        engine.dispose()
    env = service_env(database_url=sqlite_url, checkpoint_dir=str(tmp_path / "m"))
    refused = run_python(["-m", "service.cli", "migrate"], env)
    assert refused.returncode == 2
    assert "migrated by newer code" in refused.stderr and "worker(s)" not in refused.stderr
