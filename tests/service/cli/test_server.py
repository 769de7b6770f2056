"""``mnist-service run``'s banner: where to look, never the database's password."""

from __future__ import annotations

from service.cli.server import banner
from service.settings import Settings


def test_the_banner_shows_the_database_without_its_password() -> None:
    """It printed the URL whole, and the systemd unit runs this command: the password went to
    the journal (the settings' own errors never print values)."""
    url = "postgresql+psycopg://mnist:S3cretDbPassw0rd@db.internal:5432/mnist"
    text = banner(Settings(database_url=url, port=8123))
    assert "S3cretDbPassw0rd" not in text
    assert "postgresql+psycopg://mnist:***@db.internal:5432/mnist" in text
    assert "dashboard http://127.0.0.1:8123/" in text
