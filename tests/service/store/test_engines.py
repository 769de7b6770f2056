"""Engines: a PostgreSQL host that never answers is an outage within a bounded time."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from service.store import engines
from service.store.outage import is_outage


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port whose listener takes connections into its backlog and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def _fails_as_an_outage_soon(url: str) -> None:
    engine = engines.make_engine(url)
    began = time.monotonic()
    try:
        with pytest.raises(sa_exc.OperationalError) as raised, engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    # Without a connect timeout this waits for the server forever (it never answers).
    assert time.monotonic() - began < 30
    assert is_outage(raised.value)


def test_a_silent_postgresql_host_fails_as_an_outage_within_the_connect_timeout(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "POSTGRES_CONNECT_TIMEOUT_S", 1)
    _fails_as_an_outage_soon(f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/x")


def test_a_connect_timeout_in_the_url_wins(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "POSTGRES_CONNECT_TIMEOUT_S", 3600)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/x?connect_timeout=1"
    _fails_as_an_outage_soon(url)
