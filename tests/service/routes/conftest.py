"""An in-process app (real migrated database, real lifespan) and a client for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


@pytest.fixture
def api_settings(db_url: str, small_mnist: Path, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        data_dir=small_mnist,
        download=False,
        checkpoint_dir=tmp_path / "models",
        device="cpu",
        poll_interval_s=0.05,
        flush_interval_s=0.05,
    )


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as client:
        yield client
