"""SQLite's write-ahead log goes back to its limit after a large transaction and a checkpoint,
rather than keeping the large transaction's size for good."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from service.store import engines

MIB = 1024 * 1024


def test_the_wal_shrinks_back_under_its_limit_after_a_large_transaction(sqlite_url: str) -> None:
    """Without ``journal_size_limit`` the -wal file kept its largest size (107 MB after a
    960,000-step job was deleted), however small the writes after it."""
    engine = engines.make_engine(sqlite_url)
    wal = Path(sqlite_url.removeprefix("sqlite:///") + "-wal")
    try:
        with engine.connect() as connection:
            limit = connection.exec_driver_sql("PRAGMA journal_size_limit").scalar_one()
        large = max(limit, 16 * MIB) + 8 * MIB
        with engine.begin() as connection:  # one transaction of more pages than the limit
            connection.execute(text("CREATE TABLE big (b BLOB)"))
            connection.execute(
                text(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :k)"
                    " INSERT INTO big SELECT randomblob(1024) FROM n"
                ),
                {"k": large // 1024},
            )
        assert wal.stat().st_size > large - MIB
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE big"))
        raw = engine.raw_connection()  # outside a transaction, as SQLite's checkpoints run
        try:
            busy, _, _ = raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert busy == 0  # every page copied back: the next write starts the WAL over
        finally:
            raw.close()
        with engine.begin() as connection:  # a small write, as the service's are
            connection.execute(text("CREATE TABLE small (i INTEGER)"))
        assert wal.stat().st_size <= limit  # was the large transaction's size, for good
        assert 0 < limit <= 64 * MIB
    finally:
        engine.dispose()
