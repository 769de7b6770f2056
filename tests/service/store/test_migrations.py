"""The migrations build exactly the ORM's schema, on both backends, and can be undone; the
service's own configuration (no alembic.ini) finds them in a checkout from any directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from service.store import migrations
from service.store.engines import make_engine
from service.store.tables import Base
from tests.support import REPO_ROOT


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
