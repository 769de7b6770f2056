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
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, column, inspect, select, table
from sqlalchemy.exc import SQLAlchemyError

from service.store.engines import make_engine, sqlite_file
from service.store.tables import UTCDateTime
from service.store.upkeep.db_clock import database_time

SCRIPTS = "alembic"  # the scripts' folder: in this package (a wheel) or at the checkout's root
# PostgreSQL's advisory lock a migration run holds (alembic/env.py): runs at once take turns.
MIGRATION_LOCK_KEY = 0x6D6E6973_7400
# Where alembic records the revision (its default name and schema: alembic/env.py sets neither).
VERSION_TABLE = table("alembic_version", column("version_num"))


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
    """The revisions the database is at (empty when it was never migrated), read from the
    version table as alembic reads it, without alembic's MigrationContext: configuring one
    logs two INFO lines (its dialect, its DDL), which every /readyz wrote to the API's log."""
    if not inspect(connection).has_table(VERSION_TABLE.name):
        return frozenset()
    return frozenset(connection.scalars(select(VERSION_TABLE.c.version_num)))


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    """Every revision the migration scripts hold."""
    scripts = ScriptDirectory.from_config(alembic_config())
    return frozenset(script.revision for script in scripts.walk_revisions())


def revisions_text(revisions: frozenset[str]) -> str:
    """Revisions as a message names them."""
    return ", ".join(sorted(revisions)) or "no revision"


NO_SCHEMA = "the database has no schema yet: run `mnist-service migrate`"


def schema_problem(connection: Connection) -> str | None:
    """Why the database's schema is not the one this code expects, and what to run; None at
    the head. The one wording of it: ``/readyz`` and a process refusing to start say it."""
    heads, current = head_revisions(), current_revisions(connection)
    if current == heads:
        return None
    if not current:
        return NO_SCHEMA
    if current - known_revisions():
        return (
            f"the database is at {revisions_text(current)}, which this code does not know "
            "(newer code migrated it): run the newer code"
        )
    return (
        f"database at {revisions_text(current)}, code expects {revisions_text(heads)}: "
        "run `mnist-service migrate`"
    )


def startup_problem(url: str) -> str | None:
    """:func:`schema_problem` of the database at ``url``, for a process about to start: it
    refuses rather than fail at its first query with a traceback, restarted again and again.
    None where the database cannot be reached: a process starts through an outage.

    A SQLite file that is not there has no schema either: said without opening it, which made
    an empty file, and its folders wherever the path pointed, on every refused start."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return NO_SCHEMA
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return schema_problem(connection)
    except (SQLAlchemyError, OSError):
        return None
    finally:
        engine.dispose()


def workers_in_the_way(url: str, lease_s: float) -> list[str]:
    """The workers heard from within ``lease_s`` while the database is behind the head: an
    upgrade would change the schema under their code (an older worker trained 15,000 steps,
    then failed on a column gone, its job left running). Empty at the head, on a database
    never migrated, or one that cannot be read (:func:`upgrade` then says why)."""
    workers = table(
        "workers", column("id"), column("heartbeat_at", UTCDateTime()), column("stopped_at")
    )
    live = select(workers.c.id).where(
        workers.c.stopped_at.is_(None), workers.c.heartbeat_at >= database_time(-lease_s)
    )
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = current_revisions(connection)
            if not current or current == head_revisions() or current - known_revisions():
                return []  # nothing to upgrade; or newer code's schema, which upgrade refuses
            return [str(worker_id) for worker_id in connection.scalars(live)]
    except SQLAlchemyError:
        return []
    finally:
        engine.dispose()
