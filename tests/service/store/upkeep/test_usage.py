"""The store's size, as /readyz and mnist_store_bytes report it, on both databases."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from service.domain.ops import StoreSize
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import TrainStep
from service.store.upkeep import usage
from tests.records import PARAMS, FakeTraining


def test_the_size_counts_what_the_database_holds(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        before = usage.store_bytes(session)
        what = usage.describe(session)
    assert before is not None and before > 0
    assert what == (
        "pg_database_size"
        if sessions.kw["bind"].dialect.name == "postgresql"
        else "SQLite file and WAL"
    )
    job_id = FakeTraining(sessions, PARAMS).submit()
    rows = [
        {"job_id": job_id, "step": i, "epoch": 1, "loss": 0.5, "examples_seen": i}
        for i in range(1, 20_001)
    ]
    with sessions.begin() as session:
        session.execute(insert(TrainStep), rows)
    with sessions() as session:
        after = usage.store_bytes(session)
    assert after is not None
    assert after > before + 200_000  # 20,000 rows of tens of bytes each, at least


def test_the_size_is_read_at_most_once_per_ttl(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    size = StoreSize(30.0, clock=lambda: now[0])
    reads = []
    real = usage.store_bytes

    def counting(session: Session) -> int | None:
        reads.append(1)
        return real(session)

    monkeypatch.setattr(usage, "store_bytes", counting)
    with sessions() as session:
        first = size.read(session)
        now[0] = 29.9
        assert size.read(session) == first
        assert len(reads) == 1
        now[0] = 30.0
        size.read(session)
        assert len(reads) == 2
        check = size.check(session)
    assert check.name == "storage" and check.ok and check.detail.startswith(f"{first[0]} bytes")


def test_files_out_of_reach_have_no_size_until_they_are_back(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their folder at mode 000: the stat's PermissionError escaped (only a missing file was
    caught), and /readyz and /metrics answered 500. The unknown size is not kept."""
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    real_stat = Path.stat

    def stat(self: Path, **kwargs: Any) -> os.stat_result:
        if self.name.startswith("mnist.db"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    size = StoreSize(30.0, clock=lambda: 0.0)
    try:
        with sessions() as session:
            monkeypatch.setattr(Path, "stat", stat)
            assert usage.store_bytes(session) is None
            check = size.check(session)
            assert (check.ok, check.detail) == (False, "SQLite file and WAL cannot be read")
            monkeypatch.undo()
            assert size.check(session).ok  # read again at once, not a cached "unknown"
    finally:
        engine.dispose()
