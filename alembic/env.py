"""Alembic environment: the URL from the caller or the service's settings; batch mode on SQLite.

Two guards around every online run:
- SQLite: foreign keys off for the run. Batch mode changes a table by copying it and dropping
  the old one, and with foreign keys on (as every connection of the service has them) that
  drop cascades to every row referencing it: a downgrade through 0006 or 0002 deleted every
  step, epoch, alias and artifact. The pragma is a no-op inside a transaction, so it is set on
  the driver's connection before the run's begins; the references are checked
  (``PRAGMA foreign_key_check``) before the run commits, and a broken one rolls it back.
- PostgreSQL: a transaction-scoped advisory lock first. Two ``mnist-service migrate`` at once
  (two hosts' start-up scripts) both created the same tables and one failed; the second now
  waits for the first, then finds nothing left to do.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, text

from service.settings import get_settings
from service.store.engines import make_engine
from service.store.migrations import MIGRATION_LOCK_KEY
from service.store.tables import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    """sqlalchemy.url when a caller (a test) set it, else MNIST_DATABASE_URL."""
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations over a real connection."""
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            driver = connection.connection.driver_connection
            if sqlite and driver is not None:  # before the run's transaction (module docstring)
                driver.execute("PRAGMA foreign_keys=OFF")
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    lock = text("SELECT pg_advisory_xact_lock(:key)")
                    connection.execute(lock, {"key": MIGRATION_LOCK_KEY})
                context.run_migrations()
                if sqlite:
                    check_references(connection)
    finally:
        engine.dispose()


def check_references(connection: Connection) -> None:
    """Raise (the run rolls back) where a row references one that is not there."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        table, rowid, parent, _ = broken[0]
        raise RuntimeError(
            f"the migration would leave {len(broken)} rows referencing rows that are gone "
            f"(the first: {table} row {rowid}, of {parent}); nothing was changed"
        )


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
