"""Alembic from the service: where the migrations are, which revision is the head, upgrading."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from alembic import command

INI_NAME = "alembic.ini"


def alembic_ini() -> Path:
    """alembic.ini beside the packages (a checkout) or in the working directory (an image).

    An installed wheel does not carry the migrations; the Docker image copies them to its
    working directory, which is where ``mnist-service migrate`` runs.
    """
    candidates = (Path(__file__).resolve().parent.parent / INI_NAME, Path.cwd() / INI_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{INI_NAME} not found in {' or '.join(str(c.parent) for c in candidates)}"
    )


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration; ``url`` overrides MNIST_DATABASE_URL when given."""
    config = Config(str(alembic_ini()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url)
    return config


def upgrade(url: str | None = None) -> None:
    """Bring the database to the newest schema (``alembic upgrade head``)."""
    command.upgrade(alembic_config(url), "head")


@lru_cache(maxsize=1)
def head_revisions() -> frozenset[str]:
    """The revisions the code expects: the migration scripts' heads."""
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(connection: Connection) -> frozenset[str]:
    """The revisions the database is at (empty when it was never migrated)."""
    return frozenset(MigrationContext.configure(connection).get_current_heads())
