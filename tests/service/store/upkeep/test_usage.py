"""The store's size, as /readyz and mnist_store_bytes report it, on both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from service.domain.ops import StoreSize
from service.store.tables import TrainStep
from service.store.upkeep import usage
from tests.records import PARAMS, FakeTraining


def test_the_size_counts_what_the_database_holds(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        before = usage.store_bytes(session)
        what = usage.describe(session)
    assert before > 0
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
    assert after > before + 200_000  # 20,000 rows of tens of bytes each, at least


def test_the_size_is_read_at_most_once_per_ttl(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    size = StoreSize(30.0, clock=lambda: now[0])
    reads = []
    real = usage.store_bytes

    def counting(session: Session) -> int:
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
