"""The app's lifespan: what it sets up once per process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings


def test_startup_leaves_what_it_loaded_out_of_full_collections(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a worker does: a full collection walking torch's and the app's startup objects
    would pause every request meanwhile."""
    frozen: list[bool] = []
    monkeypatch.setattr("service.api.app.gc.freeze", lambda: frozen.append(True))
    with TestClient(create_app(settings)) as client:
        assert frozen == [True]
        assert client.get("/healthz").status_code == 200
