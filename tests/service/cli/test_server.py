"""``mnist-service run``'s banner: where to look, never the database's password."""

from __future__ import annotations

import socket
from pathlib import Path

from service.cli.server import banner
from service.settings import Settings
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
