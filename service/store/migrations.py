"""Alembic from the service: where the migrations are, which revision is the head, upgrading.

The configuration is built here rather than read from alembic.ini, so that an installed
service migrates a database from any working directory: a wheel carries the scripts as
``service.store.alembic`` (setup.py maps the repository's top-level ``alembic/`` there). In a
checkout, and in an editable install, they are that top-level folder itself. alembic.ini
remains for the ``alembic`` command in a checkout; logging is the caller's (the CLI's).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

SCRIPTS = "alembic"  # the scripts' folder: in this package (a wheel) or at the checkout's root
# PostgreSQL's advisory lock a migration run holds (alembic/env.py): runs at once take turns.
MIGRATION_LOCK_KEY = 0x6D6E6973_7400


def script_location() -> Path:
    """The folder of env.py and versions/: the installed package's, else the checkout's.

    A folder on disk, as alembic loads the scripts from files (a wheel is installed unpacked).
    """
    here = Path(__file__).resolve().parent
    candidates = (here / SCRIPTS, here.parents[1] / SCRIPTS)
    for path in candidates:
        if (path / "env.py").is_file():
            return path
    raise FileNotFoundError(
        f"no migration scripts (env.py) in {' or '.join(str(c) for c in candidates)}"
    )


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration; ``url`` overrides MNIST_DATABASE_URL when given."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
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
